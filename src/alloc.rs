//! The binary's global allocator: mimalloc, called the way Rust's own
//! `System` allocator calls malloc. The `mimalloc` crate's `GlobalAlloc`
//! sends every request through `mi_malloc_aligned`, whose generic path
//! (taken whenever a page's free list is empty or the block is over 1 KiB)
//! costs more than `mi_malloc`'s; a request whose alignment any mimalloc
//! block of its size already has (at most 16 bytes, and no more than the
//! size, as `System` decides) goes to the plain functions instead.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// What every mimalloc block of at least this many bytes is aligned to
/// (`MI_MAX_ALIGN_SIZE` on 64-bit targets).
const PLAIN_ALIGN_MAX: usize = 16;

pub struct Mimalloc;

#[inline]
fn plain(layout: &Layout) -> bool {
    layout.align() <= PLAIN_ALIGN_MAX && layout.align() <= layout.size()
}

unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            libmimalloc_sys::mi_malloc(layout.size()) as *mut u8
        } else {
            libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            libmimalloc_sys::mi_zalloc(layout.size()) as *mut u8
        } else {
            libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        libmimalloc_sys::mi_free(ptr as *mut c_void)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        if plain(&new) {
            libmimalloc_sys::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            libmimalloc_sys::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align())
                as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout gets a block aligned as asked, whichever path it takes,
    /// and a realloc keeps the bytes and the alignment.
    #[test]
    fn blocks_are_aligned_as_asked_on_both_paths() {
        let a = Mimalloc;
        for &align in &[1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for &size in &[1usize, 3, 8, 15, 16, 17, 24, 100, 1024, 1025, 5000, 70000] {
                let l = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(l);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(p, 0xab, size);
                    let q = a.realloc(p, l, size * 3);
                    assert_eq!(q as usize % align, 0, "realloc size {size} align {align}");
                    assert!((0..size).all(|i| *q.add(i) == 0xab));
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(l);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, l);
                }
            }
        }
    }
}
