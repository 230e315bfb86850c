//! What the fuzz targets share: reading typed values off the fuzzer's input.

/// The fuzzer's bytes, taken from the front; `None` once they run out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|b| b[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    /// Up to `max` bytes, as many as the next byte says.
    pub fn slice(&mut self, max: usize) -> Option<&[u8]> {
        let n = usize::from(self.u8()?).min(max).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}
