//! The Hessian decoder refuses hostile declared lengths before allocating for them.
//!
//! A counting global allocator (this test binary only) measures the peak bytes held by the
//! decoding thread while it reads a few bytes that declare a huge string, binary, list or class.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use imgw::codec::hessian::{from_slice, Hessian};
use imgw::codec::{Codec, DecodeError};

struct Counting;

thread_local! {
    /// Bytes this thread holds now, and the most it held since the last reset.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + delta);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

// SAFETY: forwards to the system allocator; the counter is a const-initialised thread local
// without a destructor, so touching it never allocates or re-enters the allocator.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as isize - layout.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result and the most bytes it held at once beyond what the thread
/// held before.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

#[test]
fn huge_declared_lengths_allocate_nothing_for_them() {
    let cases: &[&[u8]] = &[
        b"X\x49\x7f\xff\xff\xff",            // list of 2^31-1 elements, in 6 bytes
        b"\x56\x00\x49\x7f\xff\xff\xff",     // typed list, same length
        b"S\xff\xffab",                      // string of 65535 units
        b"R\xff\xffab",                      // string chunk of 65535 units
        b"B\xff\xffab",                      // binary of 65535 bytes
        b"C\x00\x49\x7f\xff\xff\xff",        // class with 2^31-1 fields
        b"H\x05usersX\x49\x7f\xff\xff\xffZ", // inside a message field
        b"H\x06codecs\x58\xd7\xff\xff\x00Z", // 262143 elements, 3-byte int length
    ];
    for bytes in cases {
        let (res, n) = allocated_by(|| Hessian::decode(bytes));
        assert!(res.is_err(), "{bytes:02x?}");
        assert!(n < 1024, "{bytes:02x?}: decode allocated {n} bytes");
        let (res, n) = allocated_by(|| from_slice::<Vec<String>>(bytes));
        assert!(
            matches!(
                res,
                Err(DecodeError::LengthLies { .. } | DecodeError::Malformed { .. })
            ),
            "{bytes:02x?}: {res:?}"
        );
        assert!(n < 1024, "{bytes:02x?}: from_slice allocated {n} bytes");
    }
}

#[test]
fn decoding_allocates_a_small_multiple_of_the_input() {
    // 65536 one-byte empty strings: the Vec<String> itself costs 24 bytes an element, the
    // decoder adds nothing on top of that.
    let mut bytes = vec![b'X', b'I', 0x00, 0x01, 0x00, 0x00];
    bytes.extend(std::iter::repeat_n(0x00u8, 65_536));
    let (res, n) = allocated_by(|| from_slice::<Vec<String>>(&bytes));
    assert_eq!(res.map(|v| v.len()), Ok(65_536));
    assert!(
        n <= 32 * bytes.len(),
        "allocated {n} for {} bytes",
        bytes.len()
    );
    // Skipped values allocate nothing.
    let mut msg = b"H\x02op\x04ping\x05extra".to_vec();
    msg.extend_from_slice(&bytes);
    msg.push(b'Z');
    let msg = bytes::Bytes::from(msg);
    let (res, n) = allocated_by(|| Hessian::decode_bytes(&msg));
    assert!(res.is_ok());
    assert!(n < 1024, "skipping allocated {n} bytes");
}
