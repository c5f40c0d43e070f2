//! A caching pool of device buffers: a buffer given back is kept, by exact
//! length, for the next request of that length instead of being freed, so a
//! training or decode loop that asks for the same scratch every step stops
//! calling the driver's allocator (which synchronises) after its first step.
//!
//! Generic over the buffer type so that the bookkeeping is tested on the
//! CPU; on a GPU the buffers are `CudaSlice<T>` (see `Gpu::scratch_f32`).
//! Exact lengths rather than size classes: our launchers check lengths
//! exactly, and a loop's shapes repeat exactly. Cached bytes are capped;
//! past the cap a returned buffer is freed. When an allocation fails the
//! cache is emptied and the allocation tried once more.
//!
//! A buffer that must not come back to the cache (scratch taken while a
//! CUDA graph is captured, which the graph owns) is taken with
//! [`CachingPool::take_uncached`] and freed when its guard drops.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::Result;

/// What a pool has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests answered from the cache.
    pub hits: u64,
    /// Requests that allocated.
    pub misses: u64,
    /// Bytes held in the cache now.
    pub cached_bytes: usize,
    /// Bytes handed out and not yet returned.
    pub live_bytes: usize,
    /// The most bytes handed out at once.
    pub peak_live_bytes: usize,
    /// Times the cache was emptied to retry a failed allocation.
    pub oom_retries: u64,
}

struct Inner<B> {
    free: HashMap<usize, Vec<B>>,
    stats: PoolStats,
}

/// The pool; `elem_bytes` is the size of one element of the buffers.
pub struct CachingPool<B> {
    inner: Mutex<Inner<B>>,
    elem_bytes: usize,
    max_cached_bytes: usize,
}

impl<B> std::fmt::Debug for CachingPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CachingPool({:?})", self.stats())
    }
}

impl<B> CachingPool<B> {
    /// An empty pool of buffers whose elements are `elem_bytes` wide,
    /// caching at most `max_cached_bytes`.
    pub fn new(elem_bytes: usize, max_cached_bytes: usize) -> CachingPool<B> {
        CachingPool {
            inner: Mutex::new(Inner {
                free: HashMap::new(),
                stats: PoolStats::default(),
            }),
            elem_bytes,
            max_cached_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<B>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// Frees every cached buffer.
    pub fn empty_cache(&self) {
        let dropped: Vec<Vec<B>> = {
            let mut g = self.lock();
            g.stats.cached_bytes = 0;
            g.free.drain().map(|(_, v)| v).collect()
        };
        drop(dropped);
    }

    /// A buffer of `len` elements: a cached one (passed through `reuse`,
    /// for example to zero it) or a new one from `alloc`. It returns to the
    /// pool when the guard drops.
    pub fn take(
        &self,
        len: usize,
        alloc: impl Fn(usize) -> Result<B>,
        reuse: impl FnOnce(&mut B) -> Result<()>,
    ) -> Result<Pooled<'_, B>> {
        let bytes = len * self.elem_bytes;
        let cached = {
            let mut g = self.lock();
            let b = g.free.get_mut(&len).and_then(Vec::pop);
            if b.is_some() {
                g.stats.hits += 1;
                g.stats.cached_bytes -= bytes;
            } else {
                g.stats.misses += 1;
            }
            b
        };
        let buf = match cached {
            Some(mut b) => {
                reuse(&mut b)?;
                b
            }
            None => match alloc(len) {
                Ok(b) => b,
                Err(_) => {
                    self.empty_cache();
                    self.lock().stats.oom_retries += 1;
                    alloc(len)?
                }
            },
        };
        Ok(self.lend(buf, len, true))
    }

    /// A new buffer of `len` elements from `alloc` that neither comes from
    /// the cache nor goes back to it: it is freed when the guard drops. No
    /// retry after emptying the cache (whose frees may be what the caller
    /// cannot issue, as during a CUDA graph capture).
    pub fn take_uncached(&self, len: usize, alloc: impl FnOnce(usize) -> Result<B>) -> Result<Pooled<'_, B>> {
        let buf = alloc(len)?;
        self.lock().stats.misses += 1;
        Ok(self.lend(buf, len, false))
    }

    fn lend(&self, buf: B, len: usize, cache: bool) -> Pooled<'_, B> {
        let mut g = self.lock();
        g.stats.live_bytes += len * self.elem_bytes;
        g.stats.peak_live_bytes = g.stats.peak_live_bytes.max(g.stats.live_bytes);
        Pooled {
            buf: Some(buf),
            len,
            cache,
            pool: self,
        }
    }

    fn give_back(&self, len: usize, buf: B, cache: bool) {
        let bytes = len * self.elem_bytes;
        let mut g = self.lock();
        g.stats.live_bytes -= bytes;
        if cache && g.stats.cached_bytes + bytes <= self.max_cached_bytes {
            g.stats.cached_bytes += bytes;
            g.free.entry(len).or_default().push(buf);
        } else {
            drop(g);
            drop(buf);
        }
    }
}

/// A buffer on loan from a [`CachingPool`]; dereferences to the buffer.
pub struct Pooled<'a, B> {
    buf: Option<B>,
    len: usize,
    /// Whether the buffer returns to the cache (false: freed on drop).
    cache: bool,
    pool: &'a CachingPool<B>,
}

impl<B> Pooled<'_, B> {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<B> std::ops::Deref for Pooled<'_, B> {
    type Target = B;
    fn deref(&self) -> &B {
        // The option is only emptied by drop.
        self.buf
            .as_ref()
            .unwrap_or_else(|| unreachable!("pooled buffer used after drop"))
    }
}

impl<B> std::ops::DerefMut for Pooled<'_, B> {
    fn deref_mut(&mut self) -> &mut B {
        self.buf
            .as_mut()
            .unwrap_or_else(|| unreachable!("pooled buffer used after drop"))
    }
}

impl<B> Drop for Pooled<'_, B> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give_back(self.len, b, self.cache);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::cell::Cell;

    fn fail() -> Error {
        Error::InvalidArgument {
            op: "alloc",
            msg: "out of memory".into(),
        }
    }

    #[test]
    fn same_length_requests_reuse_and_others_allocate() {
        let pool: CachingPool<Vec<f32>> = CachingPool::new(4, 1 << 20);
        let allocs = Cell::new(0);
        let alloc = |n: usize| {
            allocs.set(allocs.get() + 1);
            Ok(vec![0f32; n])
        };
        for step in 0..5 {
            let mut a = pool
                .take(100, alloc, |b| {
                    b.fill(0.0);
                    Ok(())
                })
                .unwrap();
            assert!(a.iter().all(|&x| x == 0.0), "step {step}: reused buffer not zeroed");
            a[0] = 1.0;
            let b = pool.take(100, alloc, |_| Ok(())).unwrap();
            let c = pool.take(7, alloc, |_| Ok(())).unwrap();
            assert_eq!((a.len(), b.len(), c.len()), (100, 100, 7));
            assert_eq!(pool.stats().live_bytes, 4 * 207);
        }
        // Three buffers in flight per step: three allocations in all.
        assert_eq!(allocs.get(), 3);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses), (12, 3));
        assert_eq!((s.live_bytes, s.cached_bytes, s.peak_live_bytes), (0, 4 * 207, 4 * 207));
        pool.empty_cache();
        assert_eq!(pool.stats().cached_bytes, 0);
        let _d = pool.take(100, alloc, |_| Ok(())).unwrap();
        assert_eq!(allocs.get(), 4, "emptied: allocates again");
    }

    #[test]
    fn uncached_buffers_are_freed_and_leave_the_cache_alone() {
        let pool: CachingPool<Vec<u8>> = CachingPool::new(1, 1 << 20);
        drop(pool.take(64, |n| Ok(vec![1u8; n]), |_| Ok(())).unwrap());
        let allocs = Cell::new(0);
        let u = pool
            .take_uncached(64, |n| {
                allocs.set(allocs.get() + 1);
                Ok(vec![0u8; n])
            })
            .unwrap();
        assert_eq!(allocs.get(), 1, "allocates even with a cached buffer of its length");
        assert_eq!(u[0], 0, "not the cached buffer");
        assert_eq!((pool.stats().live_bytes, pool.stats().cached_bytes), (64, 64));
        drop(u);
        let s = pool.stats();
        assert_eq!((s.live_bytes, s.cached_bytes), (0, 64), "freed, not cached");
        assert!(pool.take_uncached(8, |_| Err(fail())).is_err());
        assert_eq!(pool.stats().cached_bytes, 64, "a failure does not empty the cache");
    }

    #[test]
    fn the_cap_frees_instead_of_caching() {
        let pool: CachingPool<Vec<u8>> = CachingPool::new(1, 150);
        let alloc = |n: usize| Ok(vec![0u8; n]);
        let a = pool.take(100, alloc, |_| Ok(())).unwrap();
        let b = pool.take(100, alloc, |_| Ok(())).unwrap();
        drop(a);
        drop(b);
        assert_eq!(pool.stats().cached_bytes, 100, "the second would pass the cap");
    }

    #[test]
    fn a_failed_allocation_empties_the_cache_and_retries_once() {
        let pool: CachingPool<Vec<u8>> = CachingPool::new(1, 1 << 20);
        drop(pool.take(64, |n| Ok(vec![0u8; n]), |_| Ok(())).unwrap());
        assert_eq!(pool.stats().cached_bytes, 64);
        // The "device" has room only once the cache is freed.
        let tries = Cell::new(0);
        let got = pool.take(
            32,
            |n| {
                tries.set(tries.get() + 1);
                if tries.get() == 1 {
                    Err(fail())
                } else {
                    Ok(vec![0u8; n])
                }
            },
            |_| Ok(()),
        );
        assert!(got.is_ok());
        assert_eq!(tries.get(), 2);
        let s = pool.stats();
        assert_eq!((s.oom_retries, s.cached_bytes), (1, 0));
        drop(got);
        // Failing twice is the caller's error.
        assert!(pool.take(16, |_| Err(fail()), |_| Ok(())).is_err());
    }
}
