//! Decoding the typical message allocates nothing: its short strings are inline, its body is
//! a slice of the input (the input `Bytes` is made shared by the first decode, which is not
//! counted) and its one `ext` entry is kept inline.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use imgw::codec::CodecId;
use imgw::protocol::samples::typical_deliver;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn typical_message_decodes_without_allocating() {
    let env = typical_deliver();
    for codec in CodecId::ALL {
        let mut out = Vec::new();
        codec.encode(&env, &mut out).unwrap();
        let bytes = bytes::Bytes::from(out);
        // The first slice of a `Bytes` made from a `Vec` makes it shared (one allocation).
        assert_eq!(codec.decode_bytes(&bytes).unwrap(), env);
        let before = ALLOCS.with(|a| a.get());
        let back = codec.decode_bytes(&bytes).unwrap();
        let n = ALLOCS.with(|a| a.get()) - before;
        assert_eq!(back, env);
        assert_eq!(n, 0, "{}: {n} allocations", codec.name());
    }
}
