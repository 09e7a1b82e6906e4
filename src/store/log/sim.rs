//! [`SimStorage`]: an in-memory [`Storage`] that remembers what was synced, so that tests can
//! crash it the way a machine crashes.
//!
//! Every file keeps its current content and the content its last `sync_data` made durable;
//! directory changes (create, delete, rename) are durable only after `sync_dir`.
//! [`SimStorage::crash`] then keeps, per file, the synced content plus an arbitrary prefix of
//! what was written after it (a crash mid-`write`, or pages written back before the power
//! went), possibly torn (garbage or zeros over part of the kept unsynced bytes), and applies an
//! arbitrary prefix of the unsynced directory changes. All choices come from the seed, so a
//! failing case replays. [`SimStorage::fail_next_write`] and [`SimStorage::fail_next_sync`]
//! inject I/O errors (ENOSPC, EIO) for the callers' error paths.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::storage::{parse_segment_name, segment_name, SegmentFile, Storage};

/// splitmix64: small, deterministic, good enough to pick crash points.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    /// What the last sync made durable (content and length).
    synced: Vec<u8>,
    /// The range written since the last sync (a length change is tracked by `data.len()`).
    dirty: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link(String, u64),
    Unlink(String),
    Rename(String, String),
}

fn apply_dir_op(dir: &mut BTreeMap<String, u64>, op: &DirOp) {
    match op {
        DirOp::Link(name, ino) => {
            dir.insert(name.clone(), *ino);
        }
        DirOp::Unlink(name) => {
            dir.remove(name);
        }
        DirOp::Rename(from, to) => {
            if let Some(ino) = dir.remove(from) {
                dir.insert(to.clone(), ino);
            }
        }
    }
}

/// Which call an injected fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultOn {
    Write,
    Sync,
}

#[derive(Debug, Default)]
struct Sim {
    generation: u64,
    next_inode: u64,
    inodes: HashMap<u64, Inode>,
    dir: BTreeMap<String, u64>,
    durable_dir: BTreeMap<String, u64>,
    pending_dir: Vec<DirOp>,
    /// The call it hits, how many such calls pass first, the errno.
    fault: Option<(FaultOn, u64, i32)>,
    writes: u64,
    syncs: u64,
}

impl Sim {
    fn take_fault(&mut self, on: FaultOn) -> io::Result<()> {
        match &mut self.fault {
            Some((f, 0, errno)) if *f == on => {
                let errno = *errno;
                self.fault = None;
                Err(io::Error::from_raw_os_error(errno))
            }
            Some((f, skip, _)) if *f == on => {
                *skip -= 1;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn create(&mut self, name: &str, exclusive: bool) -> io::Result<u64> {
        if exclusive && self.dir.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        self.next_inode += 1;
        let ino = self.next_inode;
        self.inodes.insert(ino, Inode::default());
        self.dir.insert(name.to_string(), ino);
        self.pending_dir.push(DirOp::Link(name.to_string(), ino));
        Ok(ino)
    }

    fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.take_fault(FaultOn::Write)?;
        self.writes += 1;
        let inode = self.inodes.get_mut(&ino).ok_or_else(stale)?;
        let off = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        if inode.data.len() < off + bytes.len() {
            inode.data.resize(off + bytes.len(), 0);
        }
        inode.data[off..off + bytes.len()].copy_from_slice(bytes);
        let end = off + bytes.len();
        inode.dirty = Some(
            inode
                .dirty
                .map_or((off, end), |(a, b)| (a.min(off), b.max(end))),
        );
        Ok(())
    }

    fn sync(&mut self, ino: u64) -> io::Result<()> {
        self.take_fault(FaultOn::Sync)?;
        self.syncs += 1;
        let inode = self.inodes.get_mut(&ino).ok_or_else(stale)?;
        inode.synced.clone_from(&inode.data);
        inode.dirty = None;
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        self.take_fault(FaultOn::Sync)?;
        self.syncs += 1;
        self.durable_dir = self.dir.clone();
        self.pending_dir.clear();
        Ok(())
    }
}

fn stale() -> io::Error {
    io::Error::other("simulated file handle from before a crash")
}

/// An in-memory [`Storage`] with crashes and injected faults (module doc). Clones share the
/// same files: keep one to crash and inspect while the log owns another.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    sim: Arc<Mutex<Sim>>,
}

/// A segment file of [`SimStorage`]; it stops working after a crash.
#[derive(Debug)]
pub struct SimFile {
    sim: Arc<Mutex<Sim>>,
    inode: u64,
    generation: u64,
}

/// How [`SimStorage::crash`] treats each file's unsynced bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// Only synced content survives.
    DropUnsynced,
    /// Synced content plus a random prefix of the unsynced bytes, intact.
    KeepPrefix,
    /// Synced content plus a random prefix of the unsynced bytes, of which a random run
    /// (at the end, or anywhere in it) is garbage or zeros: a torn write.
    Torn,
}

impl SimStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Sim> {
        // A panic while holding the lock (a failed assertion in a test) poisons it; the state is
        // still consistent (every mutation is a few plain assignments).
        self.sim.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next write (segment or small file) fails with `errno` and writes nothing.
    pub fn fail_next_write(&self, errno: i32) {
        self.lock().fault = Some((FaultOn::Write, 0, errno));
    }

    /// The next file or directory sync fails with `errno`; what it should have made durable
    /// stays unsynced (a crash may drop it).
    pub fn fail_next_sync(&self, errno: i32) {
        self.fail_sync_after(0, errno);
    }

    /// The sync after the next `skip` ones (file or directory) fails with `errno`.
    pub fn fail_sync_after(&self, skip: u64, errno: i32) {
        self.lock().fault = Some((FaultOn::Sync, skip, errno));
    }

    /// Disarms an injected fault that has not fired.
    pub fn clear_fault(&self) {
        self.lock().fault = None;
    }

    /// Writes and syncs (file and directory) so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.writes, s.syncs)
    }

    /// The current content of file `name` (a segment: [`SimStorage::segment_file_name`]).
    pub fn file(&self, name: &str) -> Option<Vec<u8>> {
        let s = self.lock();
        let ino = s.dir.get(name)?;
        s.inodes.get(ino).map(|i| i.data.clone())
    }

    /// Overwrites file `name`'s content, synced (a test corrupting the disk).
    pub fn set_file(&self, name: &str, bytes: Vec<u8>) {
        let mut s = self.lock();
        let ino = match s.dir.get(name) {
            Some(&ino) => ino,
            None => match s.create(name, true) {
                Ok(ino) => ino,
                Err(_) => return,
            },
        };
        if let Some(i) = s.inodes.get_mut(&ino) {
            i.synced = bytes.clone();
            i.dirty = None;
            i.data = bytes;
        }
        s.durable_dir = s.dir.clone();
        s.pending_dir.clear();
    }

    /// The file name of segment `segment`.
    pub fn segment_file_name(segment: u64) -> String {
        segment_name(segment)
    }

    /// The names of all files, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().dir.keys().cloned().collect()
    }

    /// Crashes with a kind picked from `seed` (module doc). Open files stop working.
    pub fn crash(&self, seed: u64) {
        let mut rng = SimRng::new(seed);
        let kind = match rng.below(3) {
            0 => CrashKind::DropUnsynced,
            1 => CrashKind::KeepPrefix,
            _ => CrashKind::Torn,
        };
        self.crash_with(kind, &mut rng);
    }

    /// Crashes the given way, the choices drawn from `rng`.
    pub fn crash_with(&self, kind: CrashKind, rng: &mut SimRng) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.generation += 1;
        s.fault = None;
        // The directory: what was synced, then a prefix of the later changes.
        let keep_ops = if kind == CrashKind::DropUnsynced {
            0
        } else {
            rng.below(s.pending_dir.len() as u64 + 1) as usize
        };
        let mut dir = s.durable_dir.clone();
        for op in &s.pending_dir[..keep_ops] {
            apply_dir_op(&mut dir, op);
        }
        s.pending_dir.clear();
        let live: Vec<u64> = dir.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        let mut inos: Vec<u64> = s.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(inode) = s.inodes.get_mut(&ino) else {
                continue;
            };
            let mut c = inode.synced.clone();
            if kind != CrashKind::DropUnsynced {
                // A length change since the sync (a truncate, an extension) persisted or not.
                if c.len() != inode.data.len() && rng.below(2) == 0 {
                    c.resize(inode.data.len(), 0);
                }
                // A prefix of the written range, possibly torn. Never-written bytes (holes)
                // stay as they were: a crash does not put garbage where nothing was written.
                let range = inode.dirty.map(|(a, b)| (a, b.min(inode.data.len())));
                if let Some((a, b)) = range.filter(|(a, b)| a < b && rng.below(4) != 0) {
                    let keep = rng.below((b - a) as u64 + 1) as usize;
                    if c.len() < a + keep {
                        c.resize(a + keep, 0);
                    }
                    c[a..a + keep].copy_from_slice(&inode.data[a..a + keep]);
                    if kind == CrashKind::Torn && keep > 0 {
                        // A run of 1..=64 bytes, at the end of what was kept or anywhere in it.
                        let run = 1 + rng.below(keep.min(64) as u64) as usize;
                        let start = if rng.below(2) == 0 {
                            a + keep - run
                        } else {
                            a + rng.below((keep - run) as u64 + 1) as usize
                        };
                        let zeros = rng.below(2) == 0;
                        for x in &mut c[start..start + run] {
                            *x = if zeros { 0 } else { rng.next_u64() as u8 };
                        }
                    }
                }
            }
            let content = c;
            inode.data = content.clone();
            inode.dirty = None;
            inode.synced = content;
        }
        s.durable_dir = dir.clone();
        s.dir = dir;
    }

    fn file_op<T>(&self, f: impl FnOnce(&mut Sim) -> io::Result<T>) -> io::Result<T> {
        f(&mut self.lock())
    }
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut Sim, u64) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.sim.lock().unwrap_or_else(|p| p.into_inner());
        if s.generation != self.generation {
            return Err(stale());
        }
        f(&mut s, self.inode)
    }
}

impl Storage for SimStorage {
    type File = SimFile;

    fn list_segments(&self) -> io::Result<Vec<u64>> {
        let s = self.lock();
        Ok(s.dir.keys().filter_map(|n| parse_segment_name(n)).collect())
    }

    fn create_segment(&self, segment: u64) -> io::Result<SimFile> {
        let mut s = self.lock();
        let inode = s.create(&segment_name(segment), true)?;
        Ok(SimFile {
            sim: self.sim.clone(),
            inode,
            generation: s.generation,
        })
    }

    fn open_segment(&self, segment: u64) -> io::Result<SimFile> {
        let s = self.lock();
        let inode = *s
            .dir
            .get(&segment_name(segment))
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(SimFile {
            sim: self.sim.clone(),
            inode,
            generation: s.generation,
        })
    }

    fn delete_segment(&self, segment: u64) -> io::Result<()> {
        self.file_op(|s| {
            let name = segment_name(segment);
            s.dir
                .remove(&name)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            s.pending_dir.push(DirOp::Unlink(name));
            Ok(())
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.file_op(Sim::sync_dir)
    }

    fn replace_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.file_op(|s| {
            let tmp = format!("{name}.tmp");
            if let Some(old) = s.dir.remove(&tmp) {
                s.inodes.remove(&old);
                s.pending_dir.push(DirOp::Unlink(tmp.clone()));
            }
            let ino = s.create(&tmp, true)?;
            s.write(ino, 0, bytes)?;
            s.sync(ino)?;
            if let Some(ino) = s.dir.remove(&tmp) {
                s.dir.insert(name.to_string(), ino);
            }
            s.pending_dir.push(DirOp::Rename(tmp, name.to_string()));
            s.sync_dir()
        })
    }

    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.file(name))
    }
}

impl SegmentFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        self.with(|s, ino| {
            let i = s.inodes.get(&ino).ok_or_else(stale)?;
            Ok(i.data.len() as u64)
        })
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.with(|s, ino| s.write(ino, offset, bytes))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with(|s, ino| {
            let i = s.inodes.get(&ino).ok_or_else(stale)?;
            let off = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
            let src = i
                .data
                .get(off..off + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|s, ino| s.sync(ino))
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.with(|s, ino| {
            let i = s.inodes.get_mut(&ino).ok_or_else(stale)?;
            let len = usize::try_from(len).map_err(|_| io::Error::other("length"))?;
            i.data.resize(len, 0);
            Ok(())
        })
    }
}
