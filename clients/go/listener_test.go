package lessor_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgconn"
)

// connectListener opens a pgconn connection to lessor's PostgreSQL
// listener, retrying while it starts.
func connectListener(t *testing.T, ctx context.Context, app string) *pgconn.PgConn {
	t.Helper()
	host, port, _ := net.SplitHostPort(pgListenAddr)
	dsn := fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres sslmode=disable application_name=%s connect_timeout=15", host, port, app)
	deadline := time.Now().Add(15 * time.Second)
	for {
		conn, err := pgconn.Connect(ctx, dsn)
		if err == nil {
			return conn
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect to the listener: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Six pgconn clients on two server connections, each with its own named
// prepared statement used across transactions: the statement follows the
// client to whichever connection its transaction lands on.
func TestListenerPgconnPreparedStatementsAcrossTransactions(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 6)
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn := connectListener(t, ctx, fmt.Sprintf("pgconn%d", i))
			defer conn.Close(ctx)
			if _, err := conn.Prepare(ctx, "add", "SELECT $1::int + "+strconv.Itoa(i), nil); err != nil {
				errs <- fmt.Errorf("prepare: %w", err)
				return
			}
			for j := 0; j < 20; j++ {
				res := conn.ExecPrepared(ctx, "add", [][]byte{[]byte(strconv.Itoa(j))}, nil, nil).Read()
				if res.Err != nil {
					errs <- fmt.Errorf("client %d exec %d: %w", i, j, res.Err)
					return
				}
				if got, want := string(res.Rows[0][0]), strconv.Itoa(i+j); got != want {
					errs <- fmt.Errorf("client %d got %s, want %s", i, got, want)
					return
				}
				if _, err := conn.Exec(ctx, "BEGIN; SELECT 1; COMMIT").ReadAll(); err != nil {
					errs <- fmt.Errorf("client %d transaction: %w", i, err)
					return
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
