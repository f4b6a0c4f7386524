package lessor_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"

	lessor "github.com/lessor-dev/lessor/clients/go"
)

// An empty target reads LESSOR_ADDR; the application's own dial options
// (here an interceptor) are applied.
func TestDialDefaultsAndOptions(t *testing.T) {
	t.Setenv("LESSOR_ADDR", grpcAddr)
	var calls atomic.Int32
	count := grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply interface{},
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		calls.Add(1)
		return invoker(ctx, method, req, reply, cc, opts...)
	})
	client, err := lessor.Dial(context.Background(), "", count)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Stats(context.Background(), "cache"); err != nil {
		t.Fatal(err)
	}
	if calls.Load() != 1 {
		t.Fatalf("the interceptor ran %d times", calls.Load())
	}
}

// A `unix:///path` target reaches a lessor listening on a unix socket.
func TestDialUnixSocket(t *testing.T) {
	dir := t.TempDir()
	sock := "unix://" + filepath.Join(dir, "lessor.sock")
	yaml := "upstreams:\n  - name: echo\n    address: \"127.0.0.1:1\"\n    readiness: optional\n    pool: { min_idle: 0 }\n"
	_, stop, err := startLessor(lessorBin, lessorDir, sock, yaml)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	client, err := lessor.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	stats, err := client.Stats(context.Background(), "")
	if err != nil || len(stats) != 1 || stats[0].Name != "echo" {
		t.Fatalf("stats over the unix socket: %v, %v", stats, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "lessor.sock")); err != nil {
		t.Fatal(err)
	}
}
