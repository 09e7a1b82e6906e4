//! Who owns what, and the message ids: the keys every layer shares (users scoped by tenant,
//! the owner shard of a user or group) and the minting of `mid`s. Below both the shards and
//! the I/O core, so neither needs the other for them.
//!
//! A `mid` is unique across the shards of a process (the low 8 bits are the shard), across the
//! nodes of a cluster (6 bits above them are the node's slot) and across restarts: the counter
//! starts at the wall clock's milliseconds, and never below the end of the last *lease*, a
//! floor the mint writes to the data directory (`mids-<shard>.lease`, written and synced
//! before any id under it is handed out). Without the lease a shard that minted faster than
//! one id per millisecond would run ahead of the clock, and a quick restart would mint the
//! same ids again. Ids stay below 2^53 (JavaScript's exact integers).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::protocol::Str;

/// A user, scoped by tenant: nothing crosses tenants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserKey {
    pub tenant: Str,
    pub user: Str,
}

/// 2025-01-01T00:00:00Z: where a cluster node's message id counter starts counting
/// milliseconds (the counter has 6 fewer bits there, for the slot).
pub const MID_EPOCH_MS: u64 = 1_735_689_600_000;

/// Ids per lease: one small synced write per this many ids (about 10 s at 100,000 ids/s).
pub const MID_LEASE: u64 = 1 << 20;

/// The shard that owns `(tenant, id)`: FNV-1a, stable across runs and builds.
pub fn owner_shard(tenant: &str, id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0xff]).chain(id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// One shard's message id counter (see the module docs for the layout and the lease).
#[derive(Debug)]
pub struct MidMint {
    shard: u64,
    slot: Option<u64>,
    /// The last counter value handed out.
    counter: u64,
    /// Counter values up to this one are covered by the lease on disk.
    leased_to: u64,
    /// Where the lease lives; `None`: no lease (ids unique across restarts only while the
    /// shard mints less than one id per millisecond on average).
    file: Option<PathBuf>,
}

impl MidMint {
    /// A mint without a lease file, starting at the wall clock.
    pub fn unleased(shard: usize, slot: Option<u8>, unix_ms: u64) -> MidMint {
        MidMint {
            shard: shard as u64 & 0xff,
            slot: slot.map(|s| u64::from(s & 0x3f)),
            counter: clock_start(slot, unix_ms),
            leased_to: u64::MAX,
            file: None,
        }
    }

    /// A mint whose lease lives in `dir` (created if missing): starts at the later of the wall
    /// clock and the previous lease's end, and writes its first lease before returning.
    pub fn open(
        dir: &Path,
        shard: usize,
        slot: Option<u8>,
        unix_ms: u64,
    ) -> std::io::Result<MidMint> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join(format!("mids-{shard}.lease"));
        let floor = match std::fs::read_to_string(&file) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a number: {:?}", file.display(), s.trim()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut mint = MidMint::unleased(shard, slot, unix_ms);
        mint.counter = mint.counter.max(floor);
        mint.file = Some(file);
        mint.leased_to = mint.counter;
        mint.extend()?;
        Ok(mint)
    }

    /// The next id. Writes a new lease first when the current one is used up; if that write
    /// fails the id is still handed out (with a warning): refusing every send over a full
    /// disk would be worse than the rare duplicate after a restart that follows it.
    pub fn mint(&mut self) -> u64 {
        if self.counter >= self.leased_to {
            if let Err(e) = self.extend() {
                tracing::warn!(error = %e, shard = self.shard, "message id lease not written");
                self.leased_to = self.counter.saturating_add(MID_LEASE);
            }
        }
        self.counter += 1;
        match self.slot {
            Some(slot) => (self.counter << 14) | (slot << 8) | self.shard,
            None => (self.counter << 8) | self.shard,
        }
    }

    /// Writes `counter + MID_LEASE` as the new floor: a temporary file, synced, renamed over
    /// the old one (a crash leaves the old lease or the new one, never a torn one).
    fn extend(&mut self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let to = self.counter.saturating_add(MID_LEASE);
        let tmp = file.with_extension("lease.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{to}\n").as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, file)?;
        if let Some(dir) = file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.leased_to = to;
        Ok(())
    }
}

/// Where the counter starts by the clock: milliseconds, since `MID_EPOCH_MS` in a cluster.
fn clock_start(slot: Option<u8>, unix_ms: u64) -> u64 {
    match slot {
        Some(_) => unix_ms.saturating_sub(MID_EPOCH_MS),
        None => unix_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000;

    #[test]
    fn ids_carry_shard_and_slot_and_grow() {
        let mut a = MidMint::unleased(3, None, NOW_MS);
        let x = a.mint();
        assert_eq!(x & 0xff, 3);
        assert!(a.mint() > x);
        let mut c = MidMint::unleased(3, Some(5), NOW_MS);
        let y = c.mint();
        assert_eq!((y >> 8) & 0x3f, 5);
        assert_eq!(y & 0xff, 3);
        assert!(y < 1 << 53, "cluster ids stay exact in JavaScript");
    }

    /// A shard minting far faster than one id per millisecond, restarted at once (the same
    /// clock), mints ids above every id it handed out before; without a lease it would not.
    #[test]
    fn a_restart_after_a_fast_burst_mints_above_every_earlier_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut mint = MidMint::open(dir.path(), 0, None, NOW_MS).unwrap();
        let mut last = 0;
        for _ in 0..(MID_LEASE + 10) {
            last = mint.mint();
        }
        drop(mint);
        let mut again = MidMint::open(dir.path(), 0, None, NOW_MS).unwrap();
        assert!(again.mint() > last);
        // The unleased mint is the counter-example the lease exists for.
        let mut unleased = MidMint::unleased(0, None, NOW_MS);
        assert!(unleased.mint() < last);
        // Shards keep their own leases.
        let mut other = MidMint::open(dir.path(), 1, None, NOW_MS).unwrap();
        assert_eq!(other.mint() >> 8, NOW_MS + 1);
    }

    #[test]
    fn a_garbled_lease_is_an_error_not_a_silent_restart_from_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mids-0.lease"), "12x\n").unwrap();
        let e = MidMint::open(dir.path(), 0, None, NOW_MS).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
