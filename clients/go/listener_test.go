package lessor_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
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

// dialRedisListener opens a redigo connection to lessor's Redis listener,
// retrying while it starts.
func dialRedisListener(t *testing.T) redis.Conn {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		conn, err := redis.Dial("tcp", redisListenAddr, redis.DialConnectTimeout(15*time.Second))
		if err == nil {
			return conn
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect to the Redis listener: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Eight redigo clients on two server connections: each keeps its own db
// (SELECT follows the client), pipelines its commands, and a subscriber
// receives what another client publishes.
func TestListenerRedigoClientsShareConnections(t *testing.T) {
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn := dialRedisListener(t)
			defer conn.Close()
			db := i%4 + 1
			if _, err := conn.Do("SELECT", db); err != nil {
				errs <- fmt.Errorf("select: %w", err)
				return
			}
			key := fmt.Sprintf("go:%d", i)
			for j := 0; j < 20; j++ {
				conn.Send("INCR", key)
				conn.Send("GET", key)
				if err := conn.Flush(); err != nil {
					errs <- err
					return
				}
				n, err := redis.Int(conn.Receive())
				if err != nil || n != j+1 {
					errs <- fmt.Errorf("client %d INCR %d: %d %v", i, j, n, err)
					return
				}
				if _, err := conn.Receive(); err != nil {
					errs <- err
					return
				}
			}
			info, err := redis.String(conn.Do("CLIENT", "INFO"))
			if err != nil || !strings.Contains(info, fmt.Sprintf(" db=%d ", db)) {
				errs <- fmt.Errorf("client %d: CLIENT INFO %q %v", i, info, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	sub := redis.PubSubConn{Conn: dialRedisListener(t)}
	defer sub.Close()
	if err := sub.Subscribe("go-news"); err != nil {
		t.Fatal(err)
	}
	if m, ok := sub.Receive().(redis.Subscription); !ok || m.Count != 1 {
		t.Fatalf("subscribe: %#v", m)
	}
	pub := dialRedisListener(t)
	defer pub.Close()
	if n, err := redis.Int(pub.Do("PUBLISH", "go-news", "hello")); err != nil || n != 1 {
		t.Fatalf("publish: %d %v", n, err)
	}
	if m, ok := sub.Receive().(redis.Message); !ok || string(m.Data) != "hello" {
		t.Fatalf("message: %#v", m)
	}
}
