module github.com/lessor-dev/lessor/clients/go

// The least versions the code needs (it builds with Debian's Go 1.19,
// grpc-go 1.33 and protobuf 1.28; newer ones work too). The examples'
// drivers (redigo, pgconn) are their own users' choice.
go 1.19

require (
	github.com/gomodule/redigo v1.8.3
	github.com/jackc/pgconn v1.11.0
	github.com/jackc/pgproto3/v2 v2.2.0
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
