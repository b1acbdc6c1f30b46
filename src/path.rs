//! Path normalization before routing, identity and endpoint matching, so that path
//! variants (`/a/./b`, `//a`, `%2e%2e`, `%41`) cannot dodge a route or a limit.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("encoded '/' or '\\' in path")]
    EncodedSeparator,
    #[error("invalid percent-encoding in path")]
    BadEscape,
    #[error("path climbs above the root")]
    AboveRoot,
}

/// Decodes escapes of unreserved characters, upper-cases the others, merges `//` and
/// resolves `.` and `..`. Encoded separators and NUL are refused: upstreams disagree on them.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let hi = (hex[0] as char).to_digit(16).ok_or(PathError::BadEscape)?;
            let lo = (hex[1] as char).to_digit(16).ok_or(PathError::BadEscape)?;
            let c = (hi * 16 + lo) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                decoded.push(c as char);
            } else if matches!(c, b'/' | b'\\' | 0) {
                return Err(PathError::EncodedSeparator);
            } else {
                decoded.push('%');
                decoded.push_str(&format!("{c:02X}"));
            }
            i += 3;
        } else if b == b'\\' {
            return Err(PathError::EncodedSeparator);
        } else {
            decoded.push(b as char);
            i += 1;
        }
    }
    let mut segs: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segs.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => segs.push(s),
        }
    }
    let trailing = decoded.len() > 1
        && (decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/.."));
    let mut out = String::with_capacity(decoded.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !segs.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_collapse_to_one_path() {
        for p in [
            "/api/v2/architect/ivrs/1",
            "//api/v2/architect/ivrs/1",
            "/api/v2/./architect/ivrs/1",
            "/api/v2/x/../architect/ivrs/1",
            "/api/v2/%61rchitect/ivrs/1",
            "/api/v2/architect/ivrs/%2e/1",
            "/api/v2/x/%2E%2E/architect/ivrs/1",
        ] {
            assert_eq!(normalize(p).unwrap(), "/api/v2/architect/ivrs/1", "{p}");
        }
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("/a/b/").unwrap(), "/a/b/");
        assert_eq!(normalize("/a%20b").unwrap(), "/a%20b");
        assert_eq!(normalize("/a%c3%a9").unwrap(), "/a%C3%A9");
    }

    #[test]
    fn refuses_separators_and_bad_escapes() {
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%5cb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/../etc"), Err(PathError::AboveRoot));
        assert_eq!(normalize("a"), Err(PathError::NotAbsolute));
    }
}
