//! Output buffers between uses. A connection's output buffer is released when the runtime has
//! written it all, so an idle connection holds none; the shard keeps those buffers here and
//! hands them to the next connection that gets output, instead of freeing and allocating one
//! per write. A group message to 2,000 members fills 2,000 outputs in one pass and empties
//! them in the same pass or the next, so the next message finds them here, already grown to
//! the size a batch of frames needs.
//!
//! Bounds: at most [`MAX_POOLED_OUTPUTS`] buffers of at most [`MAX_POOLED_BYTES`] capacity
//! each (larger ones are freed), and none once nothing was taken for [`POOL_IDLE_MS`].

/// Buffers kept at most, per shard.
pub const MAX_POOLED_OUTPUTS: usize = 4096;
/// The largest capacity a kept buffer may have (so at most 16 MiB per shard in all).
pub const MAX_POOLED_BYTES: usize = 4096;
/// The pool is freed when no buffer was taken from it for this long.
pub const POOL_IDLE_MS: u64 = 1_000;

#[derive(Default)]
pub(super) struct OutPool {
    bufs: Vec<Vec<u8>>,
    /// A buffer was taken since the last [`OutPool::sweep`].
    taken: bool,
    /// The last sweep that saw a buffer taken (monotonic ms).
    last_taken_ms: u64,
}

impl OutPool {
    /// Gives `out` a kept buffer if it has none (`pooled`: `out` goes back to the pool when
    /// emptied, whether a kept buffer was there to give or it is allocated as it fills).
    pub(super) fn fill(&mut self, out: &mut Vec<u8>, pooled: &mut bool) {
        if out.capacity() == 0 {
            *pooled = true;
            if let Some(buf) = self.bufs.pop() {
                debug_assert!(buf.is_empty());
                *out = buf;
                self.taken = true;
            }
        }
    }

    /// Takes `out`'s emptied buffer back if it is the pool's (leaving `out` without one), or
    /// frees it: when it is not, is too large, or the pool is full. Only buffers handed out
    /// by [`OutPool::fill`] come back, so the pool holds at most as many as were in use at
    /// once.
    pub(super) fn release(&mut self, out: &mut Vec<u8>, pooled: &mut bool) {
        let mut buf = std::mem::take(out);
        if std::mem::take(pooled)
            && buf.capacity() > 0
            && buf.capacity() <= MAX_POOLED_BYTES
            && self.bufs.len() < MAX_POOLED_OUTPUTS
        {
            buf.clear();
            self.bufs.push(buf);
        }
    }

    /// Called on every tick: frees the buffers once none was taken for [`POOL_IDLE_MS`].
    pub(super) fn sweep(&mut self, now_ms: u64) {
        if self.taken {
            self.taken = false;
            self.last_taken_ms = now_ms;
        } else if !self.bufs.is_empty() && now_ms.saturating_sub(self.last_taken_ms) >= POOL_IDLE_MS
        {
            self.bufs = Vec::new();
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.bufs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_up_to_the_bound_and_freed_when_unused() {
        let mut pool = OutPool::default();
        let (mut out, mut pooled) = (Vec::new(), false);
        // An output the pool filled (nothing kept yet: allocated as it fills) comes back.
        pool.fill(&mut out, &mut pooled);
        out.extend_from_slice(&[0; 100]);
        pool.release(&mut out, &mut pooled);
        assert_eq!((out.capacity(), pooled, pool.len()), (0, false, 1));
        // The next output gets it back, empty, with its capacity.
        pool.fill(&mut out, &mut pooled);
        assert!(out.is_empty() && out.capacity() >= 100 && pooled);
        assert_eq!(pool.len(), 0);
        // An output that has a buffer keeps its own.
        pool.release(&mut Vec::with_capacity(8), &mut true);
        let ptr = out.as_ptr();
        pool.fill(&mut out, &mut pooled);
        assert_eq!((out.as_ptr(), pool.len()), (ptr, 1));
        // A buffer the pool did not hand out (the transport's own writes) is freed.
        pool.release(&mut Vec::with_capacity(8), &mut false);
        assert_eq!(pool.len(), 1);
        // Too large: freed, not kept.
        pool.release(&mut Vec::with_capacity(MAX_POOLED_BYTES + 1), &mut true);
        assert_eq!(pool.len(), 1);
        // The bound on the count.
        for _ in 0..MAX_POOLED_OUTPUTS + 10 {
            pool.release(&mut Vec::with_capacity(16), &mut true);
        }
        assert_eq!(pool.len(), MAX_POOLED_OUTPUTS);
        // Taken from within POOL_IDLE_MS: kept; then idle that long: freed.
        pool.fill(&mut Vec::new(), &mut false);
        pool.sweep(5_000);
        pool.sweep(5_000 + POOL_IDLE_MS - 1);
        assert_eq!(pool.len(), MAX_POOLED_OUTPUTS - 1);
        pool.sweep(5_000 + POOL_IDLE_MS);
        assert_eq!(pool.len(), 0);
    }
}
