//! Reading the files a config names (the config itself, PEM files, the
//! admin token) with a size cap, so a path such as `/dev/zero` or a huge
//! file by mistake is an error, not a process that reads until memory
//! runs out.

use std::io::{self, Read};
use std::path::Path;

/// The largest config, PEM or token file read: far past any real one.
pub(crate) const MAX_FILE: u64 = 16 << 20;

/// The file's bytes, or an error if it holds more than [`MAX_FILE`].
pub(crate) fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} MiB: not a config, PEM or token file", MAX_FILE >> 20),
        ));
    }
    Ok(bytes)
}

/// [`read_capped`] off the async runtime's threads.
pub(crate) async fn read_capped_async(path: &Path) -> io::Result<Vec<u8>> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || read_capped(&path)).await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_file_is_an_error() {
        let e = read_capped(Path::new("/dev/zero")).expect_err("capped");
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
        assert_eq!(read_capped(Path::new("/dev/null")).expect("empty"), b"");
    }
}
