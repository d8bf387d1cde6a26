//! Where the node's log goes and in what form: text or JSON lines, on standard error (colour
//! only when it is a terminal) or appended to a file that SIGHUP reopens, so logrotate's
//! rename-then-`kill -HUP` works without `copytruncate`.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The shape of each log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (`ts LEVEL target: message key=value ...`).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's fields
    /// (`message`, `device`, `topic`, ...) at the top level, and the enclosing spans.
    Json,
}

/// A log file opened for appending, reopened by path on request: after logrotate renames it,
/// the next line goes to a new file of the old name instead of the renamed one.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<Arc<File>>,
}

impl LogFile {
    /// Opens (creating it, mode 0640) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Arc<LogFile>> {
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(Arc::new(open_append(path)?)),
        }))
    }

    /// Opens the path again; lines being written finish in the old file. On failure (the
    /// folder is gone, say) the old file stays in use and the error is returned.
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = Arc::new(open_append(&self.path)?);
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn current(&self) -> Arc<File> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// One event's writer: the formatter writes the whole line with one `write_all`, and with
/// `O_APPEND` that is one append, so lines from different threads never interleave.
pub struct LineWriter(Arc<File>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

/// The [`MakeWriter`] of a [`LogFile`] shared with whoever reopens it.
#[derive(Clone)]
pub struct LogFileWriter(pub Arc<LogFile>);

impl<'a> MakeWriter<'a> for LogFileWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter(self.0.current())
    }
}

/// Installs the process's log subscriber: `EDGETWIN_LOG` as the filter when set (taken as it
/// is), else `info` with rumqttd's chatter (every internal link's connect and subscribe, and an
/// error-level span per routed publish) below it. Returns the log file, when there is one, for
/// SIGHUP to reopen.
pub fn init(format: LogFormat, file: Option<&Path>) -> std::io::Result<Option<Arc<LogFile>>> {
    let (env, quiet) = match EnvFilter::try_from_env("EDGETWIN_LOG") {
        Ok(f) => (f, false),
        Err(_) => (EnvFilter::new(DEFAULT_FILTER), true),
    };
    let file = file.map(LogFile::open).transpose()?;
    let fmt = match &file {
        Some(f) => formatted(format, LogFileWriter(f.clone()), false),
        None => formatted(format, std::io::stderr, std::io::stderr().is_terminal()),
    };
    let log = fmt.with_filter(env.and(tracing_subscriber::filter::filter_fn(move |m| {
        !quiet || edgetwin_broker::skips::quiet_broker_spans(m)
    })));
    // Counts what rumqttd only logs (subscribers that fell behind), whatever EDGETWIN_LOG says.
    let skips =
        edgetwin_broker::skips::skip_layer().with_filter(edgetwin_broker::skips::skip_filter());
    tracing_subscriber::registry().with(log).with(skips).init();
    Ok(file)
}

/// The filter without `EDGETWIN_LOG`: rumqttd shows warnings only.
pub const DEFAULT_FILTER: &str = "info,rumqttd=warn";

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn formatted<W>(format: LogFormat, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_reopened_log_file_writes_to_a_new_file_of_the_old_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.log");
        let log = LogFile::open(&path).unwrap();
        LogFileWriter(log.clone())
            .make_writer()
            .write_all(b"one\n")
            .unwrap();
        std::fs::rename(&path, dir.path().join("node.log.1")).unwrap();
        LogFileWriter(log.clone())
            .make_writer()
            .write_all(b"two\n")
            .unwrap();
        log.reopen().unwrap();
        LogFileWriter(log.clone())
            .make_writer()
            .write_all(b"three\n")
            .unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("node.log.1"), "one\ntwo\n");
        assert_eq!(read("node.log"), "three\n");
    }

    #[test]
    fn a_failed_reopen_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).unwrap();
        let log = LogFile::open(&sub.join("node.log")).unwrap();
        std::fs::rename(&sub, dir.path().join("moved")).unwrap();
        assert!(log.reopen().is_err());
        LogFileWriter(log.clone())
            .make_writer()
            .write_all(b"still here\n")
            .unwrap();
        let moved = std::fs::read_to_string(dir.path().join("moved/node.log")).unwrap();
        assert_eq!(moved, "still here\n");
    }
}
