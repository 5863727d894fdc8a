//! What the commands print on standard output, written without panicking.
//!
//! Rust's `print!` panics when the write fails: `agentgate completions bash | head -2` (the
//! reader goes first) ended in a panic with a backtrace, `config defaults > /dev/full` too.
//! A reader that went away wanted no more, so that is a success; any other failure is an
//! error with a sentence.

use std::io::Write;

/// Writes `text` to standard output.
pub fn write(text: impl AsRef<[u8]>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_ref()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::anyhow!("cannot write to standard output: {e}")),
    }
}

/// [`write`] with a line end.
pub fn line(text: impl std::fmt::Display) -> anyhow::Result<()> {
    write(format!("{text}\n"))
}
