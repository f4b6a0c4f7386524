// Package lessor is the Go client of lessor, the connection-pool sidecar.
//
// A lease is a net.Conn: hand it to the driver you already use (redigo's
// redis.NewConn, pgconn.Construct for PostgreSQL) and Close it when the
// request is done. lessor decides what happens to the pooled connection
// behind it (returned clean, or closed), so a bug in the application cannot
// leak one.
//
//	client, err := lessor.Dial(ctx, "")          // LESSOR_ADDR, else 127.0.0.1:7070
//	conn, err := client.Lease(ctx, "cache")      // returns once lessor grants
//	defer conn.Close()                           // Release RETURN, waits for Ended
//	rc := redis.NewConn(conn, time.Second, time.Second)
//	_, err = rc.Do("SET", "greeting", "hello")
//
// Take a lease per unit of work (a request, a transaction), not per
// process: a lease holds one pooled connection for as long as it lives.
// The context given to Lease governs the lease: cancelling it aborts the
// lease (lessor then applies the upstream's lease.on_abort), so a lease
// taken with an HTTP request's context cannot outlive the request.
//
// The gRPC stubs are in the lessorv1 package, generated from the
// repository's proto/lessor/v1/pool.proto.
package lessor
