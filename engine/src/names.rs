//! Validation of pod names, stream paths and record names (SPEC §1).

use crate::error::{Error, ErrorKind, Result};

/// The first segment of system streams.
pub const CONFIG: &str = ".config";
/// The deepest a stream may be nested.
pub const MAX_PATH_SEGMENTS: usize = 64;
/// The longest a stream path may be, in bytes. PostgreSQL's unique index on (pod, path) holds
/// at most ~2,700 bytes per entry; a bound below it, the same on every backend, refuses a
/// longer path up front instead of failing its creation halfway down.
pub const MAX_PATH_BYTES: usize = 2048;

/// `^[a-z0-9][a-z0-9-]{0,61}[a-z0-9]$`.
pub fn is_valid_pod_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (2..=63).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(inner)
}

/// 1–256 chars of `[A-Za-z0-9_-]` with single dots between runs.
pub fn is_valid_segment(seg: &str) -> bool {
    (1..=256).contains(&seg.len())
        && seg.split('.').all(|run| {
            !run.is_empty()
                && run
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        })
}

/// Checks a record name.
pub fn check_record_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::new(
            ErrorKind::MissingName,
            "a record name is required",
        ));
    }
    if !is_valid_segment(name) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "invalid record name {name:?}: use letters, digits, '_', '-' and single inner dots"
            ),
        ));
    }
    Ok(())
}

/// Checks a stream path (without leading slash; `""` is the root stream). The first segment
/// may be `.config`.
pub fn check_stream_path(path: &str) -> Result<()> {
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidPath,
            format!(
                "a stream path has at most {MAX_PATH_BYTES} bytes (this one has {})",
                path.len()
            ),
        ));
    }
    for (i, seg) in path.split('/').enumerate() {
        // Each segment is a stream row, created on the first write below it: one request may
        // create at most this many.
        if i == MAX_PATH_SEGMENTS {
            return Err(Error::new(
                ErrorKind::InvalidPath,
                format!("a stream path has at most {MAX_PATH_SEGMENTS} segments"),
            ));
        }
        if !(is_valid_segment(seg) || (i == 0 && seg == CONFIG)) {
            return Err(Error::new(
                ErrorKind::InvalidPath,
                format!("invalid stream path {path:?}: bad segment {seg:?}"),
            ));
        }
    }
    Ok(())
}

/// `true` for `.config` and everything under it.
pub fn is_system_path(path: &str) -> bool {
    path == CONFIG || path.starts_with(".config/")
}

/// A user id as stored: UUIDs in their lowercase hyphenated form, whatever form names them
/// (they are case-insensitive); anything else as it is.
pub(crate) fn canonical_user_id(id: &str) -> String {
    match uuid::Uuid::parse_str(id) {
        Ok(u) => u.hyphenated().to_string(),
        Err(_) => id.to_string(),
    }
}

/// The parent path and last segment of a non-root path.
pub fn split_last(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        for ok in ["ab", "alice", "a-1", "0x", &"a".repeat(63)] {
            assert!(is_valid_pod_name(ok), "{ok}");
        }
        for bad in ["a", "-ab", "ab-", "Ab", "a_b", "a.b", &"a".repeat(64), ""] {
            assert!(!is_valid_pod_name(bad), "{bad}");
        }
    }

    #[test]
    fn segments() {
        for ok in ["a", "index.html", "a.b.c", "A_b-9", &"x".repeat(256)] {
            assert!(is_valid_segment(ok), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a/b", "é", &"x".repeat(257)] {
            assert!(!is_valid_segment(bad), "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert!(check_stream_path("blog/posts").is_ok());
        assert!(check_stream_path(".config/owner").is_ok());
        assert!(check_stream_path("").is_ok());
        assert!(check_stream_path("a/.config").is_err());
        assert!(check_stream_path("a//b").is_err());
        let deepest = vec!["d"; MAX_PATH_SEGMENTS].join("/");
        assert!(check_stream_path(&deepest).is_ok());
        let err = check_stream_path(&format!("{deepest}/d")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidPath);
        // Eight segments of 256 bytes: 2,055 bytes, over the bound at fewer than 64 segments.
        let longest = vec!["x".repeat(255); 8].join("/");
        assert_eq!(longest.len(), 2047);
        assert!(check_stream_path(&longest).is_ok());
        let err = check_stream_path(&vec!["x".repeat(256); 8].join("/")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidPath);
        assert_eq!(split_last("a/b/c"), ("a/b", "c"));
        assert_eq!(split_last("a"), ("", "a"));
    }
}
