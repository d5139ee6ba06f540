//! A global allocator under which decoders that reserve capacity from a count read off the
//! wire cannot abort the process.
//!
//! Why: `kafka-protocol` (0.18) decodes an array by reading its length and calling
//! `Vec::with_capacity(len)` before it reads a single element. A 14-byte Metadata request
//! claiming 2³¹−1 topics asks for ~150 GB up front; the system allocator refuses, and Rust
//! aborts (`handle_alloc_error` is not a panic) — one request from any workload on the node
//! would take the proxy down. (Upstream fixes are proposed: kafka-protocol-rs PRs #152, #200.)
//!
//! [`LazyHugeAlloc`] serves allocations of 1 GiB and more with an anonymous
//! `mmap(MAP_NORESERVE)`: address space only, no memory is committed until touched. The
//! decoder then fails on the next element (the frame has no bytes for it), the vector is
//! dropped and unmapped, and the request is refused with an error — having cost one mmap and
//! one munmap. Everything smaller goes to the system allocator unchanged. Under strict
//! overcommit (`vm.overcommit_memory=2`) `MAP_NORESERVE` is ignored and such an allocation
//! still fails; the proxy's frame-size limit is the remaining bound there.
//!
//! Register it in binaries that decode untrusted Kafka frames (the proxy does, for every
//! binary linking it; the Kafka fuzz target does too).

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations from this size up are mapped lazily.
pub const LAZY_FROM: usize = 1 << 30;

#[derive(Debug, Default, Clone, Copy)]
pub struct LazyHugeAlloc;

fn lazy(size: usize, align: usize) -> bool {
    size >= LAZY_FROM && align <= 4096
}

// SAFETY: every pointer handed out is either the system allocator's (and returned to it) or
// a fresh private anonymous mapping of at least `layout.size()` bytes, page-aligned (so
// aligned for any `align <= 4096`), zero-filled, and unmapped exactly once in `dealloc`.
unsafe impl GlobalAlloc for LazyHugeAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if lazy(layout.size(), layout.align()) {
            // SAFETY: a new anonymous mapping; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    layout.size(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            return if p == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                p.cast()
            };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if lazy(layout.size(), layout.align()) {
            // SAFETY: anonymous mappings are zero-filled.
            return unsafe { self.alloc(layout) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if lazy(layout.size(), layout.align()) {
            // SAFETY: `ptr` came from our mmap of exactly this size.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
            return;
        }
        // SAFETY: `ptr` came from the system allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if !lazy(layout.size(), align) && !lazy(new_size, align) {
            // SAFETY: both sizes stay with the system allocator.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size` is valid for `align`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
        // SAFETY: allocate, copy the live prefix, free the old block.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn huge_reservations_are_lazy_and_usable() {
        // 64 GiB of capacity: more than this machine has, untouched.
        let mut v: Vec<u64> = Vec::with_capacity(8 << 30);
        v.push(7);
        v.extend_from_slice(&[1, 2, 3]);
        assert_eq!(v.iter().sum::<u64>(), 13);
        v.shrink_to_fit();
        assert_eq!(v, vec![7, 1, 2, 3]);
    }
}
