package lessor_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	lessor "github.com/lessor-dev/lessor/clients/go"
	"github.com/lessor-dev/lessor/clients/go/lessorv1"
)

func lease(t *testing.T, client *lessor.Client, upstream string) *lessor.Lease {
	t.Helper()
	l, err := client.Lease(context.Background(), upstream)
	if err != nil {
		t.Fatalf("lease %s: %v", upstream, err)
	}
	return l
}

// readN reads exactly n bytes within patience.
func readN(t *testing.T, l *lessor.Lease, n int) string {
	t.Helper()
	l.SetReadDeadline(time.Now().Add(patience))
	defer l.SetReadDeadline(time.Time{})
	buf := make([]byte, n)
	if _, err := io.ReadFull(l, buf); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return string(buf)
}

func TestLeaseRoundTrip(t *testing.T) {
	client := dial(t)
	l := lease(t, client, "cache")
	g := l.Granted()
	if g.Protocol != "redis" || g.LeaseId == "" || g.ConnectionId == 0 {
		t.Fatalf("granted: %+v", g)
	}
	if tcp, ok := l.RemoteAddr().(*net.TCPAddr); !ok || tcp.String() != g.Endpoint {
		t.Fatalf("RemoteAddr %v, endpoint %s", l.RemoteAddr(), g.Endpoint)
	}
	if l.LocalAddr().String() != grpcAddr {
		t.Fatalf("LocalAddr %v", l.LocalAddr())
	}
	if _, err := l.Write([]byte("PING\r\n")); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, l, 7); got != "+PONG\r\n" {
		t.Fatalf("got %q", got)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	e := l.Ended()
	if e == nil || e.Disposition != lessorv1.Disposition_RETURN || e.Reason != lessorv1.EndReason_CLIENT_RELEASE {
		t.Fatalf("ended: %+v", e)
	}
	if _, err := l.Write([]byte("PING\r\n")); !errors.Is(err, lessor.ErrLeaseClosed) {
		t.Fatalf("write after close: %v", err)
	}
}

func TestPipelinedWrites(t *testing.T) {
	client := dial(t)
	l := lease(t, client, "cache")
	defer l.Close()
	const n = 100
	if _, err := l.Write([]byte("SET lessor-go-pipelined 0\r\n")); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		if _, err := l.Write([]byte("INCR lessor-go-pipelined\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	// Every write went out before any reply was read; the replies come back
	// whole and in order.
	var want strings.Builder
	want.WriteString("+OK\r\n")
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&want, ":%d\r\n", i)
	}
	if got := readN(t, l, want.Len()); got != want.String() {
		t.Fatalf("got %q", got)
	}
}

func TestDeadlines(t *testing.T) {
	client := dial(t)
	l := lease(t, client, "raw")
	defer l.Close()
	// A deadline in the past: the Read returns at once.
	l.SetReadDeadline(time.Now().Add(-time.Second))
	_, err := l.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("past deadline: %v", err)
	}
	// A Read blocked on a silent upstream returns at its deadline, set
	// while it is blocked.
	l.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := l.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the Read block first (either order passes)
	l.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	select {
	case err := <-done:
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("blocked read: %v", err)
		}
	case <-time.After(patience):
		t.Fatal("a blocked Read ignored its deadline")
	}
	// The lease is still usable once the deadline is cleared.
	l.SetDeadline(time.Time{})
	if _, err := l.Write([]byte("PING\r\n")); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, l, 7); got != "+PONG\r\n" {
		t.Fatalf("got %q", got)
	}
	// A write deadline in the past fails the Write.
	l.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := l.Write([]byte("PING\r\n")); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("past write deadline: %v", err)
	}
}

func TestCloseReturnsTheConnectionAndEvictClosesIt(t *testing.T) {
	client := dial(t)
	first := lease(t, client, "solo")
	id := first.Granted().ConnectionId
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	next := lease(t, client, "solo")
	if next.Granted().ConnectionId != id || !next.Granted().Reused {
		t.Fatalf("after RETURN: %+v, want connection %d reused", next.Granted(), id)
	}
	if err := next.Evict(); err != nil {
		t.Fatal(err)
	}
	if e := next.Ended(); e.Disposition != lessorv1.Disposition_EVICT {
		t.Fatalf("evict ended: %+v", e)
	}
	third := lease(t, client, "solo")
	defer third.Close()
	if third.Granted().ConnectionId == id {
		t.Fatal("an evicted connection was granted again")
	}
}

func TestLeaseEndingUnderTheClientIsEOF(t *testing.T) {
	client := dial(t)
	l := lease(t, client, "idle")
	// lease.idle_timeout is 300ms: lessor revokes the lease while the
	// client waits for bytes that never come.
	l.SetReadDeadline(time.Now().Add(patience))
	n, err := l.Read(make([]byte, 16))
	if n != 0 || err != io.EOF {
		t.Fatalf("read: %d, %v; want io.EOF", n, err)
	}
	e := l.Ended()
	if e == nil || e.Reason != lessorv1.EndReason_LEASE_IDLE || e.Disposition != lessorv1.Disposition_EVICT {
		t.Fatalf("ended: %+v", e)
	}
	if err := l.Close(); !errors.Is(err, lessor.ErrLeaseClosed) && err != nil {
		t.Fatalf("close after the end: %v", err)
	}
}

func TestErrors(t *testing.T) {
	client := dial(t)
	ctx := context.Background()
	if _, err := client.Lease(ctx, "nope"); !errors.Is(err, lessor.ErrUnknownUpstream) {
		t.Fatalf("unknown upstream: %v", err)
	}
	// solo: one connection, one waiter allowed.
	held := lease(t, client, "solo")
	defer held.Close()
	waiterCtx, cancelWaiter := context.WithCancel(ctx)
	waiter := make(chan error, 1)
	go func() {
		l, err := client.Lease(waiterCtx, "solo")
		if err == nil {
			l.Close()
		}
		waiter <- err
	}()
	eventually(t, "the waiter to queue", func() bool {
		stats, err := client.Stats(ctx, "solo")
		return err == nil && stats[0].Waiting == 1
	})
	if _, err := client.Lease(ctx, "solo"); !errors.Is(err, lessor.ErrPoolExhausted) {
		t.Fatalf("exhausted: %v", err)
	}
	// Cancelling the context during the checkout ends it with the
	// context's error.
	cancelWaiter()
	select {
	case err := <-waiter:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled checkout: %v", err)
		}
	case <-time.After(patience):
		t.Fatal("a cancelled checkout did not return")
	}
	eventually(t, "the cancelled checkout to leave the queue", func() bool {
		stats, err := client.Stats(ctx, "solo")
		return err == nil && stats[0].Waiting == 0
	})
	// A deadline bounds the checkout too.
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	// Whichever notices first: the context's deadline, or lessor's own
	// checkout timeout (which it took from that deadline).
	_, err := client.Lease(short, "solo")
	if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, lessor.ErrPoolExhausted) {
		t.Fatalf("deadline: %v", err)
	}
}

func TestExchangeAndStats(t *testing.T) {
	client := dial(t)
	ctx := context.Background()
	reply, err := client.Exchange(ctx, "cache", []byte("SET lessor-go v\r\nGET lessor-go\r\n"))
	if err != nil || string(reply) != "+OK\r\n$1\r\nv\r\n" {
		t.Fatalf("exchange: %q, %v", reply, err)
	}
	if _, err := client.Exchange(ctx, "raw", []byte("PING\r\n")); !errors.Is(err, lessor.ErrNotProtocolUpstream) {
		t.Fatalf("tcp upstream: %v", err)
	}
	if _, err := client.Exchange(ctx, "cache", []byte("SUBSCRIBE x\r\n")); !errors.Is(err, lessor.ErrInvalidArgument) {
		t.Fatalf("refused command: %v", err)
	}
	stats, err := client.Stats(ctx, "cache")
	if err != nil || len(stats) != 1 || stats[0].Name != "cache" || stats[0].Protocol != "redis" {
		t.Fatalf("stats: %v, %v", stats, err)
	}
	if stats[0].Exchanges["ok"] < 1 {
		t.Fatalf("exchanges: %v", stats[0].Exchanges)
	}
	all, err := client.Stats(ctx, "")
	if err != nil || len(all) < 4 {
		t.Fatalf("all stats: %d, %v", len(all), err)
	}
}

// A thousand leases: half closed; a quarter abandoned with their context
// cancelled while a 1 MiB reply streams in (so their receiver is holding
// bytes nobody will read); a quarter dropped the same way with a context
// that is never cancelled, left to the garbage collector. Once lessor has
// ended them all, no goroutine of theirs is left.
func TestNoGoroutineOutlivesItsLease(t *testing.T) {
	client := dial(t)
	big := bytes.Repeat([]byte("x"), 1<<20)
	set := append([]byte(fmt.Sprintf("*3\r\n$3\r\nSET\r\n$14\r\nlessor-go-big1\r\n$%d\r\n", len(big))), big...)
	if _, err := client.Exchange(context.Background(), "cache", append(set, "\r\n"...)); err != nil {
		t.Fatal(err)
	}
	// Warm the gRPC connection, so its own goroutines are in the baseline.
	l := lease(t, client, "cache")
	l.Close()
	runtime.GC()
	baseline := runtime.NumGoroutine()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := 0; i < 1000; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			ctx, cancel := context.WithCancel(context.Background())
			if i%4 == 3 {
				// Never cancelled: only the finalizer can end this one.
				ctx = context.Background()
			}
			l, err := client.Lease(ctx, "cache")
			if err != nil {
				t.Error(err)
				cancel()
				return
			}
			if i%2 == 0 {
				if _, err := l.Write([]byte("PING\r\n")); err != nil {
					t.Error(err)
				}
				readN(t, l, 7)
				if err := l.Close(); err != nil {
					t.Error(err)
				}
				cancel()
				return
			}
			// Abandoned mid-reply: one byte read, never closed.
			if _, err := l.Write([]byte("GET lessor-go-big1\r\n")); err != nil {
				t.Error(err)
			}
			readN(t, l, 1)
			cancel()
		}(i)
	}
	wg.Wait()
	eventually(t, "the leases' goroutines to end", func() bool {
		runtime.GC()
		return runtime.NumGoroutine() <= baseline+2
	})
	eventually(t, "lessor to count every lease ended", func() bool {
		stats, err := client.Stats(context.Background(), "cache")
		return err == nil && stats[0].Leased == 0
	})
}
