package lessor_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/gomodule/redigo/redis"
	"github.com/jackc/pgconn"

	lessor "github.com/lessor-dev/lessor/clients/go"
)

// redigo, unchanged, over a lease: the lease is the net.Conn redigo reads
// and writes. Closing redigo's connection closes the lease (a RETURN: every
// command had its reply, so lessor returns the connection).
func ExampleLease_redigo() {
	ctx := context.Background()
	client, err := lessor.Dial(ctx, grpcAddr) // "" reads LESSOR_ADDR
	if err != nil {
		panic(err)
	}
	defer client.Close()

	lease, err := client.Lease(ctx, "cache")
	if err != nil {
		panic(err)
	}
	conn := redis.NewConn(lease, time.Second, time.Second)
	if _, err := conn.Do("SET", "greeting", "hello from Go"); err != nil {
		panic(err)
	}
	greeting, err := redis.String(conn.Do("GET", "greeting"))
	if err != nil {
		panic(err)
	}
	conn.Close()
	fmt.Println(greeting)
	fmt.Println(lease.Ended().Disposition, lease.Ended().Reason)
	// Output:
	// hello from Go
	// RETURN CLIENT_RELEASE
}

// A PostgreSQL session adopted over a lease: lessor ran the startup and
// authentication, and Granted carries what pgconn's own startup would
// have learned, so pgconn.Construct takes the lease as an open, idle
// connection. Closing it sends Terminate, which lessor turns into a RETURN.
func ExampleLease_pgconn() {
	ctx := context.Background()
	client, err := lessor.Dial(ctx, grpcAddr)
	if err != nil {
		panic(err)
	}
	defer client.Close()

	lease, err := client.Lease(ctx, "db")
	if err != nil {
		panic(err)
	}
	g := lease.Granted()
	config, err := pgconn.ParseConfig("")
	if err != nil {
		panic(err)
	}
	pg, err := pgconn.Construct(&pgconn.HijackedConn{
		Conn:              lease,
		PID:               uint32(g.BackendPid),
		SecretKey:         binary.BigEndian.Uint32(g.BackendSecret),
		ParameterStatuses: g.ServerParameters,
		TxStatus:          'I',
		Frontend:          config.BuildFrontend(lease, lease),
		Config:            config,
	})
	if err != nil {
		panic(err)
	}
	result := pg.ExecParams(ctx, "SELECT current_user, $1::int + 1",
		[][]byte{[]byte("41")}, nil, nil, nil).Read()
	if result.Err != nil {
		panic(result.Err)
	}
	fmt.Println(string(result.Rows[0][0]), string(result.Rows[0][1]))
	pg.Close(ctx)
	fmt.Println(lease.Ended().Disposition, lease.Ended().Reason)
	// Output:
	// postgres 42
	// RETURN CLIENT_RELEASE
}
