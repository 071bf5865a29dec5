//! Reading a file of lines in parallel: byte ranges cut at line boundaries, large positioned reads,
//! and a line read back by its offset (to compare the ids of two events whose hashes are equal).

use super::*;

/// Calls `f(position, line)` for every line whose first byte lies in `[start, end)` (a line ends at
/// `\n`; a final line may lack it). Adds the bytes read to `done`.
pub(super) fn for_each_line(
    file: &File,
    start: u64,
    end: u64,
    done: &AtomicU64,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut base = if start == 0 {
        0
    } else {
        // The line that holds byte `start - 1` belongs to the range before.
        match find_newline(file, start - 1)? {
            Some(nl) => nl + 1,
            None => {
                done.fetch_add(end.saturating_sub(start), Ordering::Relaxed);
                return Ok(());
            }
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK * 2);
    let mut reported = start;
    loop {
        let mut consumed = 0usize;
        while let Some(nl) = buf.get(consumed..).and_then(|b| memchr::memchr(b'\n', b)) {
            let at = base + consumed as u64;
            if at >= end {
                done.fetch_add(end.saturating_sub(reported), Ordering::Relaxed);
                return Ok(());
            }
            f(at, buf.get(consumed..consumed + nl).unwrap_or_default())?;
            consumed += nl + 1;
        }
        buf.drain(..consumed);
        base += consumed as u64;
        if base >= end {
            done.fetch_add(end.saturating_sub(reported), Ordering::Relaxed);
            return Ok(());
        }
        let old = buf.len();
        buf.resize(old + CHUNK, 0);
        let n = read_at(
            file,
            buf.get_mut(old..).unwrap_or_default(),
            base + old as u64,
        )?;
        buf.truncate(old + n);
        let now = (base + buf.len() as u64).min(end);
        done.fetch_add(now.saturating_sub(reported), Ordering::Relaxed);
        reported = reported.max(now);
        if n == 0 {
            if !buf.is_empty() {
                f(base, &buf)?;
            }
            return Ok(());
        }
    }
}

pub(super) fn read_at(file: &File, buf: &mut [u8], at: u64) -> Result<usize> {
    loop {
        match file.read_at(buf, at) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the file"),
        }
    }
}

/// The position of the first `\n` at or after `at`.
pub(super) fn find_newline(file: &File, mut at: u64) -> Result<Option<u64>> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = read_at(file, &mut buf, at)?;
        let Some(read) = buf.get(..n) else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(None);
        }
        if let Some(i) = memchr::memchr(b'\n', read) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
}

/// The line that starts at `at`, without its `\n`.
pub(super) fn line_at(file: &File, at: u64) -> Result<Vec<u8>> {
    let end = find_newline(file, at)?;
    let len = match end {
        Some(nl) => nl - at,
        None => file.metadata()?.len().saturating_sub(at),
    };
    let mut line = vec![0u8; usize::try_from(len)?];
    file.read_exact_at(&mut line, at)
        .context("reading a line back")?;
    Ok(line)
}

/// The line without a trailing `\r`, or `None` for a blank line.
pub(super) fn record(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    (!line.iter().all(u8::is_ascii_whitespace)).then_some(line)
}
