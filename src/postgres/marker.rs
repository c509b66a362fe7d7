//! The record of a rewind or clone in progress: a file beside the data
//! directory (`<data_dir>.pgha-job`; inside it pg_rewind would delete it as
//! a file the source lacks, and pg_basebackup needs the directory empty).
//! Written before the tool starts and removed only once it succeeded, so an
//! agent that stopped or died part way knows on its next start that the
//! data directory must not run as it is.

use std::io;
use std::path::{Path, PathBuf};

/// What was under way when the agent last stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// pg_rewind had started: the directory may be part old, part new.
    Rewind,
    /// pg_basebackup had started into an empty directory: what is there is
    /// a partial copy, written by the agent itself.
    Clone,
}

impl Unfinished {
    fn word(self) -> &'static str {
        match self {
            Unfinished::Rewind => "rewind",
            Unfinished::Clone => "clone",
        }
    }
}

/// The marker file of one data directory.
#[derive(Debug, Clone)]
pub struct JobMarker {
    path: PathBuf,
}

impl JobMarker {
    pub fn for_data_dir(data_dir: &Path) -> JobMarker {
        let mut name = data_dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "data".into());
        name.push(".pgha-job");
        JobMarker {
            path: data_dir.with_file_name(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `job` durably (written, synced, renamed into place) before
    /// the tool touches the data directory.
    pub fn begin(&self, job: Unfinished, source: &str) -> io::Result<()> {
        let tmp = self.path.with_extension("pgha-job.tmp");
        let text = format!("{}\nsource {source}\n", job.word());
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            // The rename itself must survive a crash.
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The job finished: the data directory is whole again.
    pub fn finish(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// What the marker records, if anything. A marker that cannot be read
    /// or names no known job counts as an unfinished rewind: the directory
    /// is then never started as it is, and a rewind is the repair that
    /// loses nothing.
    pub fn read(&self) -> io::Result<Option<Unfinished>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(Some(match text.lines().next().map(str::trim) {
                Some("clone") => Unfinished::Clone,
                _ => Unfinished::Rewind,
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_read_finish() {
        let dir = std::env::temp_dir().join(format!("pgha-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = JobMarker::for_data_dir(&dir.join("data"));
        assert_eq!(m.path(), dir.join("data.pgha-job"));
        assert_eq!(m.read().unwrap(), None);
        m.begin(Unfinished::Rewind, "n2").unwrap();
        assert_eq!(m.read().unwrap(), Some(Unfinished::Rewind));
        m.begin(Unfinished::Clone, "n3").unwrap();
        assert_eq!(m.read().unwrap(), Some(Unfinished::Clone));
        m.finish().unwrap();
        assert_eq!(m.read().unwrap(), None);
        m.finish().unwrap();
        std::fs::write(m.path(), "garbage").unwrap();
        assert_eq!(m.read().unwrap(), Some(Unfinished::Rewind));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
