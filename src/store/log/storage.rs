//! The files under the log: the [`Storage`] trait (segment files by number, small files replaced
//! atomically, directory sync) and [`FsStorage`], its implementation on plain files.
//!
//! The log only ever writes a segment at its end (positional writes at the offset it tracks),
//! reads at any offset, and syncs data with `fdatasync`. Creating, deleting and renaming files
//! are durable only after [`Storage::sync_dir`]; the log calls it where a crash must not lose
//! them. The simulated implementation for tests is [`super::sim::SimStorage`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The directory of one log: its segment files, numbered from 1, and a few small files
/// (the checkpoint) that are only ever replaced whole.
pub trait Storage: Send + 'static {
    /// An open segment file.
    type File: SegmentFile;

    /// The numbers of the segment files present, ascending. Other files are ignored.
    fn list_segments(&self) -> io::Result<Vec<u64>>;
    /// Creates segment `segment`, empty; fails if it exists. Its directory entry is durable
    /// after the next [`Storage::sync_dir`].
    fn create_segment(&self, segment: u64) -> io::Result<Self::File>;
    /// Opens an existing segment for reading and writing.
    fn open_segment(&self, segment: u64) -> io::Result<Self::File>;
    /// Deletes a segment file (durable after the next [`Storage::sync_dir`]). Open handles
    /// keep working until dropped.
    fn delete_segment(&self, segment: u64) -> io::Result<()>;
    /// Makes the directory's entries (created, deleted, renamed files) durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Replaces the small file `name` atomically and durably: writes `name.tmp`, syncs it,
    /// renames it over `name` and syncs the directory. After a crash `name` holds either the
    /// old or the new content, whole.
    fn replace_file(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// The content of the small file `name`, `None` if it does not exist.
    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
}

/// One open segment file.
pub trait SegmentFile: Send + 'static {
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Writes all of `bytes` at `offset` (the log always passes its end: an append).
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Fills `buf` from `offset`; an error if the file ends first.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// `fdatasync`: the written bytes (and the length) are durable when it returns.
    fn sync_data(&self) -> io::Result<()>;
    /// Sets the file's length: cuts it, or extends it with zeros (a sparse hole on a real file
    /// system). Durable after the next [`SegmentFile::sync_data`].
    fn truncate(&self, len: u64) -> io::Result<()>;
}

/// The name of segment `segment`: 20 decimal digits, so names sort by number.
pub(crate) fn segment_name(segment: u64) -> String {
    format!("{segment:020}.seg")
}

/// The segment number of a file name written by [`segment_name`].
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// [`Storage`] on a directory of plain files (`std::fs`, positional I/O, `fdatasync`).
#[derive(Debug, Clone)]
pub struct FsStorage {
    dir: PathBuf,
}

impl FsStorage {
    /// The log in directory `dir`, created (with its parents) if missing.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(FsStorage { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A segment file of [`FsStorage`].
#[derive(Debug)]
pub struct FsFile {
    file: File,
}

impl Storage for FsStorage {
    type File = FsFile;

    fn list_segments(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(n) = entry.file_name().to_str().and_then(parse_segment_name) {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn create_segment(&self, segment: u64) -> io::Result<FsFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(segment_name(segment)))?;
        Ok(FsFile { file })
    }

    fn open_segment(&self, segment: u64) -> io::Result<FsFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(segment_name(segment)))?;
        Ok(FsFile { file })
    }

    fn delete_segment(&self, segment: u64) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(segment_name(segment)))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn replace_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, self.dir.join(name))?;
        self.sync_dir()
    }

    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl SegmentFile for FsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}
