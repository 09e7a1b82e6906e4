//! Output for the hand-written encoders of the named-map formats: they write through [`Sink`],
//! implemented by `Vec<u8>`.
//!
//! (A pre-sized, zero-filled buffer written through an index was tried: fewer instructions,
//! but slower on the clock, as every byte then waits for the previous one's position update.)

/// Where an encoder writes bytes.
pub(crate) trait Sink {
    fn put(&mut self, b: u8);
    fn put_slice(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline(always)]
    fn put(&mut self, b: u8) {
        self.push(b);
    }

    #[inline(always)]
    fn put_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}
