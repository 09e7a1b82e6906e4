//! Readiness polling for one loadgen thread: an epoll set over its connections' sockets, and
//! a wait that ends at the thread's next deadline with microsecond precision (epoll_wait's
//! timeout counts whole milliseconds, which would add up to a millisecond of the loadgen's
//! lateness to every latency it measures). The wait is `epoll_pwait2` (nanosecond timeout,
//! Linux 5.11+) with the thread's timer slack lowered to 1 us; on older kernels a timerfd in
//! the epoll set provides the deadline instead.
//!
//! This module owns the only `unsafe` code of the loadgen: the libc calls, each with its
//! contract stated.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Token reported for the timer; connection tokens must differ from it.
const TIMER_TOKEN: u64 = u64::MAX;
/// Events taken per wait.
const BATCH: usize = 256;

pub struct Poller {
    epoll: OwnedFd,
    timer: OwnedFd,
    events: Vec<libc::epoll_event>,
    /// `epoll_pwait2` works here (cleared on ENOSYS: the timerfd is used then).
    pwait2: bool,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 and timerfd_create take no pointers; a non-negative result is
        // a new descriptor that we own from here on (OwnedFd closes it).
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let timer = unsafe {
            OwnedFd::from_raw_fd(check(libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            ))?)
        };
        // SAFETY: prctl(PR_SET_TIMERSLACK) takes plain integers and affects only the calling
        // thread (the one that will wait on this poller). Failure only costs precision.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
        }
        let p = Poller {
            epoll,
            timer,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; BATCH],
            pwait2: true,
        };
        p.ctl(libc::EPOLL_CTL_ADD, p.timer.as_raw_fd(), TIMER_TOKEN)?;
        Ok(p)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; the kernel checks
        // both descriptors.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Watches `fd` for readability (level-triggered), reported as `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert_ne!(token, TIMER_TOKEN);
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    /// Stops watching `fd` (call before closing it).
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0)
    }

    /// Waits until a watched descriptor is readable or `timeout` passed (zero: just looks),
    /// and appends the ready tokens to `ready`.
    pub fn wait(&mut self, timeout: Duration, ready: &mut Vec<u64>) -> io::Result<()> {
        let n = if timeout.is_zero() {
            self.epoll_wait(0)?
        } else if self.pwait2 {
            match self.epoll_pwait2(timeout) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    self.pwait2 = false;
                    self.arm(timeout)?;
                    self.epoll_wait(-1)?
                }
                other => other?,
            }
        } else {
            self.arm(timeout)?;
            self.epoll_wait(-1)?
        };
        for ev in &self.events[..n] {
            let token = ev.u64;
            if token == TIMER_TOKEN {
                self.drain_timer();
            } else {
                ready.push(token);
            }
        }
        Ok(())
    }

    fn epoll_wait(&mut self, ms: libc::c_int) -> io::Result<usize> {
        // SAFETY: `events` has room for BATCH entries and outlives the call.
        let r = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                BATCH as libc::c_int,
                ms,
            )
        };
        match check(r) {
            Ok(n) => Ok(n as usize),
            // A signal: report nothing ready; the caller loops anyway.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn epoll_pwait2(&mut self, timeout: Duration) -> io::Result<usize> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: `events` has room for BATCH entries, `ts` is a valid timespec; both outlive
        // the call. A null signal mask means "leave the mask alone".
        let r = unsafe {
            libc::epoll_pwait2(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                BATCH as libc::c_int,
                &ts,
                std::ptr::null(),
            )
        };
        match check(r) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Arms the one-shot timer `timeout` from now (replacing any earlier setting).
    fn arm(&self, timeout: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
                // A zero it_value would disarm the timer: wait at least 1 ns.
                tv_nsec: libc::c_long::from(timeout.subsec_nanos().max(1)),
            },
        };
        // SAFETY: `spec` is valid for the call; a null old-value pointer is allowed.
        check(unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        })?;
        Ok(())
    }

    fn drain_timer(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`; the descriptor is non-blocking, so an
        // already drained timer returns EAGAIN, which is fine to ignore.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn timer_wakes_with_sub_millisecond_precision_and_sockets_are_reported() {
        for pwait2 in [true, false] {
            wait_and_report(pwait2);
        }
    }

    fn wait_and_report(pwait2: bool) {
        let mut p = Poller::new().unwrap();
        p.pwait2 = pwait2;
        let mut ready = Vec::new();
        let t0 = Instant::now();
        p.wait(Duration::from_micros(300), &mut ready).unwrap();
        let waited = t0.elapsed();
        assert!(ready.is_empty());
        assert!(waited >= Duration::from_micros(300), "{waited:?}");
        assert!(waited < Duration::from_millis(50), "{waited:?}");

        let (a, mut b) = UnixStream::pair().unwrap();
        p.add(a.as_raw_fd(), 7).unwrap();
        p.wait(Duration::ZERO, &mut ready).unwrap();
        assert!(ready.is_empty());
        b.write_all(b"x").unwrap();
        p.wait(Duration::from_secs(2), &mut ready).unwrap();
        assert_eq!(ready, [7]);
        p.remove(a.as_raw_fd()).unwrap();
        ready.clear();
        p.wait(Duration::from_millis(1), &mut ready).unwrap();
        assert!(ready.is_empty());
    }
}
