package lessor_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// The committed stubs are what scripts/generate makes from the proto now:
// a change to proto/lessor/v1/pool.proto without regenerating fails here.
func TestStubsAreCurrent(t *testing.T) {
	if _, err := exec.LookPath("protoc"); err != nil {
		if os.Getenv("LESSOR_REQUIRE_PROTOC") == "1" {
			t.Fatal("protoc not found, and LESSOR_REQUIRE_PROTOC=1")
		}
		t.Skip("protoc not found: set LESSOR_REQUIRE_PROTOC=1 to fail instead")
	}
	out := t.TempDir()
	cmd := exec.Command("scripts/generate", out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("scripts/generate: %v\n%s", err, msg)
	}
	for _, name := range []string{"pool.pb.go", "pool_grpc.pb.go"} {
		fresh, err := os.ReadFile(filepath.Join(out, name))
		if err != nil {
			t.Fatal(err)
		}
		committed, err := os.ReadFile(filepath.Join("lessorv1", name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(fresh, committed) {
			t.Errorf("lessorv1/%s is stale: run clients/go/scripts/generate", name)
		}
	}
}
