package lessor

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors, one per way a call to lessor fails, for errors.Is. Every
// error a Client returns for a gRPC status is an *Error that matches the
// sentinel of its code.
var (
	// ErrUnknownUpstream: no upstream of that name is configured (NOT_FOUND;
	// also a Cancel for a lease that is not live).
	ErrUnknownUpstream = errors.New("lessor: unknown upstream")
	// ErrPoolExhausted: every connection stayed leased until the checkout
	// timeout, or too many checkouts were already waiting
	// (RESOURCE_EXHAUSTED).
	ErrPoolExhausted = errors.New("lessor: pool exhausted")
	// ErrCheckoutTimeout: a deadline passed inside lessor
	// (DEADLINE_EXCEEDED): the upstream stayed paused, a health check ran
	// past the checkout timeout, or an Exchange's reply came too late.
	ErrCheckoutTimeout = errors.New("lessor: deadline exceeded")
	// ErrUnavailable: the upstream cannot be reached, refused the session
	// (a wrong password), or lessor is shutting down (UNAVAILABLE).
	ErrUnavailable = errors.New("lessor: unavailable")
	// ErrInvalidArgument: lessor refused what was sent (INVALID_ARGUMENT).
	ErrInvalidArgument = errors.New("lessor: invalid argument")
	// ErrNotProtocolUpstream: Exchange on a `protocol: tcp` upstream
	// (FAILED_PRECONDITION).
	ErrNotProtocolUpstream = errors.New("lessor: not a protocol upstream")
	// ErrLeaseClosed: the lease was closed by this client.
	ErrLeaseClosed = errors.New("lessor: lease closed")
)

// Error is a failed call to lessor: its gRPC code and message.
type Error struct {
	Code    codes.Code
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("lessor: %s: %s", e.Code, e.Message)
}

// Is matches the sentinel of the error's code.
func (e *Error) Is(target error) bool {
	return sentinel(e.Code) == target && target != nil
}

func sentinel(code codes.Code) error {
	switch code {
	case codes.NotFound:
		return ErrUnknownUpstream
	case codes.ResourceExhausted:
		return ErrPoolExhausted
	case codes.DeadlineExceeded:
		return ErrCheckoutTimeout
	case codes.Unavailable:
		return ErrUnavailable
	case codes.InvalidArgument:
		return ErrInvalidArgument
	case codes.FailedPrecondition:
		return ErrNotProtocolUpstream
	}
	return nil
}

// wrap turns a gRPC error into an *Error; a context's own cancellation or
// deadline comes back as the context's error, so errors.Is(err,
// context.Canceled) holds.
func wrap(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if ctx != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	if s.Code() == codes.Canceled {
		return context.Canceled
	}
	return &Error{Code: s.Code(), Message: s.Message()}
}
