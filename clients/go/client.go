package lessor

import (
	"context"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"

	"github.com/lessor-dev/lessor/clients/go/lessorv1"
)

// DefaultTarget is where lessor listens when neither Dial's target nor
// LESSOR_ADDR says otherwise.
const DefaultTarget = "127.0.0.1:7070"

// Client talks to one lessor sidecar over one gRPC connection, shared by
// every lease and call; it is safe for concurrent use.
type Client struct {
	conn   *grpc.ClientConn
	pool   lessorv1.PoolClient
	target string
}

// Dial connects to lessor at target: `host:port`, or `unix:///path` for a
// socket shared through a volume. An empty target means LESSOR_ADDR, else
// DefaultTarget. The application's own options (interceptors, keepalive,
// message sizes) are applied after lessor's defaults (plaintext: lessor
// listens on loopback or a unix socket). Dial does not wait for the
// connection unless grpc.WithBlock is among opts.
func Dial(ctx context.Context, target string, opts ...grpc.DialOption) (*Client, error) {
	if target == "" {
		target = os.Getenv("LESSOR_ADDR")
	}
	if target == "" {
		target = DefaultTarget
	}
	dialTarget := target
	base := []grpc.DialOption{grpc.WithInsecure()}
	if path := strings.TrimPrefix(target, "unix://"); path != target {
		// grpc-go 1.33 has no unix resolver: dial the socket ourselves.
		dialTarget = "passthrough:///lessor"
		base = append(base, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	}
	conn, err := grpc.DialContext(ctx, dialTarget, append(base, opts...)...)
	if err != nil {
		return nil, wrap(ctx, err)
	}
	return &Client{conn: conn, pool: lessorv1.NewPoolClient(conn), target: target}, nil
}

// Close closes the gRPC connection: every live lease on it is aborted.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Pool is the generated gRPC client, for what this package does not wrap.
func (c *Client) Pool() lessorv1.PoolClient {
	return c.pool
}

// Exchange sends one request to a protocol upstream (`protocol: redis`:
// whole commands; `postgres`: whole frontend messages ending with a Query
// or a Sync) and returns exactly its reply, on a pooled connection that
// lessor returns clean. An error reply from the upstream is a successful
// Exchange. ctx's deadline bounds the call.
func (c *Client) Exchange(ctx context.Context, upstream string, request []byte) ([]byte, error) {
	req := &lessorv1.ExchangeRequest{Upstream: upstream, Request: request}
	if deadline, ok := ctx.Deadline(); ok {
		req.TimeoutMs = millis(time.Until(deadline))
	}
	resp, err := c.pool.Exchange(ctx, req)
	if err != nil {
		return nil, wrap(ctx, err)
	}
	return resp.Reply, nil
}

// Stats returns the pool statistics of one upstream, or of every upstream
// when upstream is empty.
func (c *Client) Stats(ctx context.Context, upstream string) ([]*lessorv1.UpstreamStats, error) {
	resp, err := c.pool.Stats(ctx, &lessorv1.StatsRequest{Upstream: upstream})
	if err != nil {
		return nil, wrap(ctx, err)
	}
	return resp.Upstreams, nil
}

// Cancel asks PostgreSQL to cancel what the lease with this id is running
// (best effort, as PostgreSQL's own cancel); the lease's reply says whether
// it was. ErrUnknownUpstream when no such PostgreSQL lease is live.
func (c *Client) Cancel(ctx context.Context, leaseID string) error {
	_, err := c.pool.Cancel(ctx, &lessorv1.CancelRequest{LeaseId: leaseID})
	return wrap(ctx, err)
}

// millis is a positive duration in whole milliseconds, at least 1, clamped
// to what the protocol carries.
func millis(d time.Duration) uint32 {
	ms := d.Milliseconds()
	switch {
	case ms < 1:
		return 1
	case ms > int64(^uint32(0)):
		return ^uint32(0)
	}
	return uint32(ms)
}
