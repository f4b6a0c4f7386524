package lessor_test

// The tests run against a real `lessor serve` (LESSOR_BIN, built by cargo)
// in front of a real redis-server, both started here on free ports, and a
// real PostgreSQL at LESSOR_TEST_PG_ADDR (trust login as `postgres`;
// scripts/test starts one). Nothing is mocked.

import (
	"context"
	"fmt"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"testing"
	"time"

	lessor "github.com/lessor-dev/lessor/clients/go"
)

// patience bounds every wait on a condition: generous, so a busy two-core
// machine does not flake; a broken build fails anyway.
const patience = 15 * time.Second

var (
	// grpcAddr is the lessor under test.
	grpcAddr string
	// pgAddr is the PostgreSQL behind the `db` upstream.
	pgAddr string
	// pgListenAddr is lessor's native PostgreSQL listener, in front of
	// pgAddr.
	pgListenAddr string
	// redisListenAddr is lessor's native Redis listener, in front of the
	// test's redis-server.
	redisListenAddr string
	// lessorBin and lessorDir start further lessors (a unix socket one).
	lessorBin, lessorDir string
)

func TestMain(m *testing.M) {
	code, err := run(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "lessor Go tests:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(m *testing.M) (int, error) {
	bin := os.Getenv("LESSOR_BIN")
	if bin == "" {
		return 0, fmt.Errorf("set LESSOR_BIN to a built lessor binary (scripts/test does)")
	}
	dir, err := os.MkdirTemp("", "lessor-go-test")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	redisAddr, stopRedis, err := startRedis()
	if err != nil {
		return 0, err
	}
	defer stopRedis()
	pgAddr = os.Getenv("LESSOR_TEST_PG_ADDR")
	if pgAddr == "" {
		return 0, fmt.Errorf("set LESSOR_TEST_PG_ADDR to a PostgreSQL with a trust login for postgres (scripts/test does)")
	}
	lessorBin, lessorDir = bin, dir
	pgListenAddr = fmt.Sprintf("127.0.0.1:%d", freePort())
	redisListenAddr = fmt.Sprintf("127.0.0.1:%d", freePort())
	config := upstreams(redisAddr, pgAddr) + native(pgAddr, pgListenAddr) + nativeRedis(redisAddr, redisListenAddr)
	addr, stopLessor, err := startLessor(bin, dir, "", config)
	if err != nil {
		return 0, err
	}
	defer stopLessor()
	grpcAddr = addr
	return m.Run(), nil
}

func upstreams(redis, pg string) string {
	return fmt.Sprintf(`upstreams:
  - name: cache
    address: "%[1]s"
    protocol: redis
    pool: { max_size: 16, min_idle: 2 }
  - name: raw
    address: "%[1]s"
    pool: { max_size: 8, min_idle: 1 }
  - name: solo
    address: "%[1]s"
    protocol: redis
    pool: { max_size: 1, min_idle: 1, max_waiters: 1, checkout_timeout: 10s }
  - name: idle
    address: "%[1]s"
    protocol: redis
    pool: { max_size: 4, min_idle: 1 }
    lease: { idle_timeout: 300ms }
  - name: db
    address: "%[2]s"
    protocol: postgres
    postgres: { user: postgres, database: postgres }
    pool: { max_size: 2, min_idle: 1 }
`, redis, pg)
}

// native is an upstream whose listener unmodified PostgreSQL clients
// (pgconn) use, pooled per transaction over two server connections.
func native(pg, listen string) string {
	return fmt.Sprintf(`  - name: dbnative
    address: "%s"
    protocol: postgres
    postgres: { user: postgres, database: postgres }
    pool: { max_size: 2, min_idle: 1 }
    listen: { address: "%s", pool_mode: transaction }
`, pg, listen)
}

// nativeRedis is an upstream whose listener unmodified Redis clients
// (redigo) use, pooled per pipeline over two server connections.
func nativeRedis(redis, listen string) string {
	return fmt.Sprintf(`  - name: cachenative
    address: "%s"
    protocol: redis
    pool: { max_size: 2, min_idle: 1 }
    listen: { address: "%s" }
`, redis, listen)
}

// freePort is a port nothing listens on now, from a range the kernel does
// not hand out for port 0 or outgoing connections; callers retry on a clash.
func freePort() int {
	for {
		port := 20000 + rand.Intn(10000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			l.Close()
			return port
		}
	}
}

func startRedis() (string, func(), error) {
	for attempt := 0; attempt < 5; attempt++ {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort())
		_, port, _ := net.SplitHostPort(addr)
		cmd := exec.Command("redis-server", "--port", port, "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no")
		if err := cmd.Start(); err != nil {
			return "", nil, fmt.Errorf("redis-server: %w", err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		stop := func() { cmd.Process.Kill(); <-exited }
		if waitFor(func() bool {
			c, err := net.Dial("tcp", addr)
			if err == nil {
				c.Close()
			}
			return err == nil
		}, exited) {
			return addr, stop, nil
		}
		stop()
	}
	return "", nil, fmt.Errorf("redis-server did not start")
}

// startLessor starts `lessor serve` with yaml's upstreams, listening on
// listen (a free loopback port when empty); returns its gRPC address.
func startLessor(bin, dir, listen, yaml string) (string, func(), error) {
	for attempt := 0; attempt < 4; attempt++ {
		grpc := listen
		if grpc == "" {
			grpc = fmt.Sprintf("127.0.0.1:%d", freePort())
		}
		admin := fmt.Sprintf("127.0.0.1:%d", freePort())
		// Each process gets a file of its own: lessor reloads its config
		// when the file changes, so a shared name would reconfigure the
		// sidecar every other test uses.
		file, err := os.CreateTemp(dir, "lessor-*.yaml")
		if err != nil {
			return "", nil, err
		}
		path := file.Name()
		config := fmt.Sprintf("grpc: { listen: %q }\nadmin: { listen: %q, control_listen: \"\" }\n%s", grpc, admin, yaml)
		_, err = file.WriteString(config)
		if cerr := file.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return "", nil, err
		}
		cmd := exec.Command(bin, "serve", "--config", path)
		cmd.Stdout = os.Stderr
		cmd.Stderr = os.Stderr
		cmd.Env = append(os.Environ(), "RUST_LOG=warn")
		if err := cmd.Start(); err != nil {
			return "", nil, err
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		stop := func() { cmd.Process.Signal(os.Interrupt); <-exited }
		if waitFor(func() bool {
			resp, err := http.Get("http://" + admin + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		}, exited) {
			return grpc, stop, nil
		}
		stop()
	}
	return "", nil, fmt.Errorf("lessor serve did not become ready")
}

// waitFor polls cond until it holds (true), the process exits, or
// patience runs out (false).
func waitFor(cond func() bool, exited <-chan struct{}) bool {
	deadline := time.Now().Add(patience)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		select {
		case <-exited:
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	return false
}

// eventually fails the test unless cond holds within patience.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	if !waitFor(cond, nil) {
		t.Fatalf("timed out waiting for %s", what)
	}
}

// dial is a client of the lessor under test.
func dial(t testing.TB) *lessor.Client {
	t.Helper()
	client, err := lessor.Dial(context.Background(), grpcAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}
