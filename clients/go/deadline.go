package lessor

import (
	"os"
	"sync"
	"time"
)

// deadline is one direction's net.Conn deadline: a channel that is closed
// when the deadline passes, replaced whenever the deadline moves, so a
// blocked Read or Write wakes when a deadline set meanwhile passes.
type deadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	passed chan struct{}
}

func newDeadline() *deadline {
	return &deadline{passed: make(chan struct{})}
}

// set moves the deadline; the zero time means none.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		// The old timer fired (or is firing): the channel is closed or
		// about to be; start from a fresh one.
		<-d.passed
		d.passed = make(chan struct{})
	}
	d.timer = nil
	select {
	case <-d.passed:
		d.passed = make(chan struct{})
	default:
	}
	if t.IsZero() {
		return
	}
	wait := time.Until(t)
	if wait <= 0 {
		close(d.passed)
		return
	}
	passed := d.passed
	d.timer = time.AfterFunc(wait, func() { close(passed) })
}

// wait is closed once the current deadline has passed.
func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.passed
}

// timeoutError is what a Read or Write past its deadline returns: a
// net.Error whose Timeout() is true, as drivers expect.
type timeoutError struct{}

func (timeoutError) Error() string   { return "lessor: i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

// Is makes errors.Is(err, os.ErrDeadlineExceeded) hold, as for net.Conn.
func (timeoutError) Is(target error) bool { return target == os.ErrDeadlineExceeded }
