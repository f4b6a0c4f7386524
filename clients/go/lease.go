package lessor

import (
	"context"

	"io"
	"net"
	"runtime"
	"sync"
	"time"

	"github.com/lessor-dev/lessor/clients/go/lessorv1"
)

// LeaseOption changes one lease request.
type LeaseOption func(*lessorv1.Acquire)

// WithCheckoutTimeout shortens how long lessor may wait for a connection
// (it cannot exceed the upstream's pool.checkout_timeout). Without it, the
// context's deadline, if any, is used.
func WithCheckoutTimeout(d time.Duration) LeaseOption {
	return func(a *lessorv1.Acquire) { a.CheckoutTimeoutMs = millis(d) }
}

// WithMaxLease shortens the lease's maximum duration (it cannot exceed the
// upstream's lease.max_duration); lessor ends the lease after it.
func WithMaxLease(d time.Duration) LeaseOption {
	return func(a *lessorv1.Acquire) { a.MaxLeaseMs = millis(d) }
}

// WithHolder names what holds the lease (a route, a job; at most 256
// bytes): lessor shows it in /debug/leases and in its lease.warn_after
// warning, so a leaked lease names its holder.
func WithHolder(holder string) LeaseOption {
	return func(a *lessorv1.Acquire) { a.Holder = holder }
}

// CloseTimeout bounds how long Close and Evict wait for lessor's Ended.
var CloseTimeout = 5 * time.Second

// Lease is a leased upstream connection, usable as a net.Conn: Write sends
// bytes to the upstream, Read returns its bytes in order, and io.EOF once
// the lease has ended and every byte was read. Close releases it with
// RETURN (lessor returns the connection if it is clean), Evict with EVICT.
//
// Reads and writes may be concurrent with each other, as for any net.Conn;
// writes are sent in order and never wait for a reply. A Lease dropped
// without Close is aborted when its context is cancelled or when the
// garbage collector finds it; no goroutine outlives its stream.
type Lease struct {
	*leaseState
}

// Ended says how a lease ended: what happened to the connection and why.
type Ended struct {
	// Disposition is RETURN (back in the pool) or EVICT (closed).
	Disposition lessorv1.Disposition
	// Reason is why the lease ended.
	Reason lessorv1.EndReason
	// Detail names what was unfinished, or the limit that fired.
	Detail string
}

// leaseState is everything the lease's goroutines share: they hold it,
// never the Lease, so an abandoned Lease can be collected (its finalizer
// then cancels the stream).
type leaseState struct {
	stream  lessorv1.Pool_LeaseClient
	ctx     context.Context
	cancel  context.CancelFunc
	granted *lessorv1.Granted
	local   net.Addr

	// Upstream bytes from the receiver, in order; closed when the stream
	// ends.
	data chan []byte
	// Closed by Close/Evict: the receiver drops further bytes.
	discard     chan struct{}
	discardOnce sync.Once
	// Closed when the receiver is done; then ended and streamErr are final.
	done      chan struct{}
	ended     *Ended
	streamErr error

	readMu  sync.Mutex
	unread  []byte
	readDL  *deadline
	writeDL *deadline

	// Messages to send, in order; the sender goroutine owns stream.Send.
	sends    chan send
	closeMu  sync.Mutex
	released bool
}

type send struct {
	msg    *lessorv1.LeaseRequest
	result chan error
}

// Lease takes a connection of upstream, returning once lessor grants it.
// ctx governs the whole lease: its deadline bounds the checkout (unless
// WithCheckoutTimeout says otherwise), and cancelling it aborts the lease.
func (c *Client) Lease(ctx context.Context, upstream string, opts ...LeaseOption) (*Lease, error) {
	acquire := &lessorv1.Acquire{Upstream: upstream}
	if deadline, ok := ctx.Deadline(); ok {
		acquire.CheckoutTimeoutMs = millis(time.Until(deadline))
	}
	for _, opt := range opts {
		opt(acquire)
	}
	streamCtx, cancel := context.WithCancel(ctx)
	stream, err := c.pool.Lease(streamCtx)
	if err != nil {
		cancel()
		return nil, wrap(ctx, err)
	}
	first := &lessorv1.LeaseRequest{Msg: &lessorv1.LeaseRequest_Acquire{Acquire: acquire}}
	if err := stream.Send(first); err != nil {
		cancel()
		return nil, recvError(ctx, stream, err)
	}
	resp, err := stream.Recv()
	if err != nil {
		cancel()
		return nil, wrap(ctx, err)
	}
	granted := resp.GetGranted()
	if granted == nil {
		cancel()
		return nil, &Error{Message: "the first message of a lease was not Granted"}
	}
	s := &leaseState{
		stream:  stream,
		ctx:     streamCtx,
		cancel:  cancel,
		granted: granted,
		local:   addr(c.target),
		data:    make(chan []byte),
		discard: make(chan struct{}),
		done:    make(chan struct{}),
		readDL:  newDeadline(),
		writeDL: newDeadline(),
		sends:   make(chan send),
	}
	go s.receive()
	go s.sendLoop()
	lease := &Lease{s}
	runtime.SetFinalizer(lease, func(l *Lease) { l.cancel() })
	return lease, nil
}

// recvError is the reason a Send failed: gRPC reports it on Recv.
func recvError(ctx context.Context, stream lessorv1.Pool_LeaseClient, sendErr error) error {
	if _, err := stream.Recv(); err != nil && err != io.EOF {
		return wrap(ctx, err)
	}
	return wrap(ctx, sendErr)
}

// receive moves upstream bytes to Read, keeps Ended, and ends with the
// stream.
func (s *leaseState) receive() {
	defer close(s.done)
	defer close(s.data)
	for {
		resp, err := s.stream.Recv()
		if err != nil {
			if err != io.EOF {
				s.streamErr = wrap(s.ctx, err)
			}
			// Whatever way the stream ended, nothing is left to cancel.
			s.cancel()
			return
		}
		switch m := resp.Msg.(type) {
		case *lessorv1.LeaseResponse_Data:
			select {
			case s.data <- m.Data:
			case <-s.discard:
			case <-s.ctx.Done():
			}
		case *lessorv1.LeaseResponse_Ended:
			s.ended = &Ended{
				Disposition: m.Ended.Disposition,
				Reason:      m.Ended.Reason,
				Detail:      m.Ended.Detail,
			}
		}
	}
}

// sendLoop owns stream.Send, so writes go out in order and a Write can
// give up at its deadline without tearing a message.
func (s *leaseState) sendLoop() {
	for {
		select {
		case msg := <-s.sends:
			err := s.stream.Send(msg.msg)
			if err == nil {
				if _, release := msg.msg.Msg.(*lessorv1.LeaseRequest_Release); release {
					err = s.stream.CloseSend()
				}
			}
			msg.result <- err
		case <-s.ctx.Done():
			return
		case <-s.done:
			return
		}
	}
}

// Granted is lessor's grant: lease id, connection id and reuse, the wait,
// the protocol, and for PostgreSQL the session's parameters and key.
func (l *Lease) Granted() *lessorv1.Granted {
	return l.granted
}

// Ended reports how the lease ended, once it has (nil before).
func (l *Lease) Ended() *Ended {
	select {
	case <-l.done:
		return l.ended
	default:
		return nil
	}
}

// Read returns upstream bytes in order; io.EOF once the lease has ended
// and everything was read (Ended then says how it ended).
func (l *Lease) Read(p []byte) (int, error) {
	l.readMu.Lock()
	defer l.readMu.Unlock()
	if len(l.unread) == 0 {
		select {
		case <-l.readDL.wait():
			return 0, timeoutError{}
		default:
		}
		select {
		case b, ok := <-l.data:
			if !ok {
				return 0, l.endError()
			}
			l.unread = b
		case <-l.readDL.wait():
			return 0, timeoutError{}
		}
	}
	n := copy(p, l.unread)
	l.unread = l.unread[n:]
	return n, nil
}

// endError is what Read returns after the stream: io.EOF when the lease
// ended (however lessor ended it), the stream's error otherwise.
func (l *Lease) endError() error {
	<-l.done
	if l.ended != nil || l.streamErr == nil {
		return io.EOF
	}
	return l.streamErr
}

// Write sends p to the upstream. It returns once the bytes are handed to
// the stream (not when the upstream answered), or at the write deadline.
func (l *Lease) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	data := append([]byte(nil), p...)
	msg := &lessorv1.LeaseRequest{Msg: &lessorv1.LeaseRequest_Data{Data: data}}
	if err := l.submit(msg, l.writeDL.wait()); err != nil {
		return 0, err
	}
	return len(p), nil
}

// submit hands one message to the sender and waits for it (or the
// deadline, or the end of the lease).
func (l *Lease) submit(msg *lessorv1.LeaseRequest, deadline <-chan struct{}) error {
	l.closeMu.Lock()
	released := l.released
	l.closeMu.Unlock()
	if released {
		return ErrLeaseClosed
	}
	s := send{msg: msg, result: make(chan error, 1)}
	select {
	case l.sends <- s:
	case <-deadline:
		return timeoutError{}
	case <-l.done:
		return l.afterEnd()
	case <-l.ctx.Done():
		return l.afterEnd()
	}
	select {
	case err := <-s.result:
		if err != nil {
			return l.afterEnd()
		}
		return nil
	case <-deadline:
		return timeoutError{}
	}
}

// afterEnd is the error of a write to a lease that has ended.
func (l *Lease) afterEnd() error {
	select {
	case <-l.done:
		if l.streamErr != nil {
			return l.streamErr
		}
	default:
	}
	return io.ErrClosedPipe
}

// Close releases the lease with RETURN and waits (up to CloseTimeout) for
// lessor's Ended, discarding upstream bytes not read yet. lessor returns
// the connection to the pool only if it is clean (for a protocol upstream:
// every reply delivered, no transaction open); Ended says what happened.
func (l *Lease) Close() error {
	return l.release(lessorv1.Disposition_RETURN)
}

// Evict releases the lease with EVICT: lessor closes the connection
// (after a protocol error, or when the session state is unknown).
func (l *Lease) Evict() error {
	return l.release(lessorv1.Disposition_EVICT)
}

func (l *Lease) release(disposition lessorv1.Disposition) error {
	l.closeMu.Lock()
	if l.released {
		l.closeMu.Unlock()
		return ErrLeaseClosed
	}
	l.released = true
	l.closeMu.Unlock()
	runtime.SetFinalizer(l, nil)
	l.discardOnce.Do(func() { close(l.discard) })
	defer l.cancel()
	timer := time.NewTimer(CloseTimeout)
	defer timer.Stop()
	msg := &lessorv1.LeaseRequest{Msg: &lessorv1.LeaseRequest_Release{
		Release: &lessorv1.Release{Disposition: disposition},
	}}
	s := send{msg: msg, result: make(chan error, 1)}
	select {
	case l.sends <- s:
	case <-l.done:
	case <-timer.C:
		return timeoutError{}
	}
	select {
	case <-l.done:
	case <-timer.C:
		return timeoutError{}
	}
	if l.ended == nil && l.streamErr != nil {
		return l.streamErr
	}
	return nil
}

// LocalAddr is the lessor sidecar the lease goes through.
func (l *Lease) LocalAddr() net.Addr { return l.local }

// RemoteAddr is the upstream endpoint the leased connection is open to.
func (l *Lease) RemoteAddr() net.Addr { return addr(l.granted.Endpoint) }

// SetDeadline sets both the read and the write deadline.
func (l *Lease) SetDeadline(t time.Time) error {
	l.readDL.set(t)
	l.writeDL.set(t)
	return nil
}

// SetReadDeadline makes a Read blocked past t return a timeout error
// (net.Error with Timeout() true); the zero time clears it.
func (l *Lease) SetReadDeadline(t time.Time) error {
	l.readDL.set(t)
	return nil
}

// SetWriteDeadline makes a Write blocked past t return a timeout error.
func (l *Lease) SetWriteDeadline(t time.Time) error {
	l.writeDL.set(t)
	return nil
}

// addr turns "ip:port" into a *net.TCPAddr when it is one, and keeps
// anything else (a unix socket) as it is.
func addr(s string) net.Addr {
	if tcp, err := net.ResolveTCPAddr("tcp", s); err == nil && tcp.IP != nil {
		return tcp
	}
	return textAddr(s)
}

type textAddr string

func (a textAddr) Network() string { return "lessor" }
func (a textAddr) String() string  { return string(a) }

var _ net.Conn = (*Lease)(nil)
