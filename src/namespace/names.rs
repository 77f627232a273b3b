//! Which S3 key components can be POSIX file names, and how paths become keys.

/// The longest file name most Linux filesystems (and the kernel's FUSE layer) accept.
pub const NAME_MAX: usize = 255;

/// The longest object key, in bytes of UTF-8: "The name for a key is a sequence of Unicode
/// characters whose UTF-8 encoding is at most 1,024 bytes long" (Amazon S3 User Guide, *Naming
/// Amazon S3 objects*). A path whose key would be longer can't be stored: it gets
/// `ENAMETOOLONG` when made, and can't exist when looked up. The kernel's own limit, `PATH_MAX`,
/// is 4 096.
pub const MAX_KEY_LEN: usize = 1024;

/// Why a key component can't be shown as a file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidName {
    Empty,
    Dot,
    DotDot,
    TooLong,
    Nul,
    /// A `/` inside one component: only a server that ignores the delimiter sends that.
    Slash,
    /// A key (or a directory's prefix, `/` included) past [`MAX_KEY_LEN`]: a server laxer than
    /// S3 stored it, but such a path can't be looked up, made or uploaded here.
    KeyTooLong,
}

impl std::fmt::Display for InvalidName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InvalidName::Empty => "empty path component",
            InvalidName::Dot => "component is \".\"",
            InvalidName::DotDot => "component is \"..\"",
            InvalidName::TooLong => "component longer than 255 bytes",
            InvalidName::Nul => "contains a NUL byte",
            InvalidName::Slash => "contains a slash (listing ignored the delimiter)",
            InvalidName::KeyTooLong => "key longer than S3's 1 024-byte limit",
        })
    }
}

/// Checks one path component: what the kernel can take as a name (no `/`, no NUL, not `.` or
/// `..`, at most [`NAME_MAX`] bytes; `path_resolution(7)`).
pub fn check_component(name: &str) -> Result<(), InvalidName> {
    match name {
        "" => Err(InvalidName::Empty),
        "." => Err(InvalidName::Dot),
        ".." => Err(InvalidName::DotDot),
        _ if name.len() > NAME_MAX => Err(InvalidName::TooLong),
        _ if name.contains('\0') => Err(InvalidName::Nul),
        _ if name.contains('/') => Err(InvalidName::Slash),
        _ => Ok(()),
    }
}

/// Checks a listed entry: `name` must be a file name ([`check_component`]) and `key` (an
/// object's key, or a directory's prefix with its `/`) at most [`MAX_KEY_LEN`] bytes, so that
/// what a listing shows can be looked up.
pub fn check_listed(key: &str, name: &str) -> Result<(), InvalidName> {
    check_component(name)?;
    if key.len() > MAX_KEY_LEN {
        return Err(InvalidName::KeyTooLong);
    }
    Ok(())
}

/// Whether `name` in directory `dir` (`""` for the root) is keepfs's own (the snapshots under
/// `.keepfs/`): never shown, never created.
pub fn is_reserved(dir: &str, name: &str) -> bool {
    dir.is_empty() && name == crate::snapshot::RESERVED_DIR
}

/// Joins a directory path (relative to the mount root, `""` for the root) and a child name.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// The key prefix under which a directory's children live: `PREFIX` + `dir/`.
pub fn dir_key(prefix: &str, dir: &str) -> String {
    if dir.is_empty() {
        prefix.to_owned()
    } else {
        format!("{prefix}{dir}/")
    }
}

/// Normalises a mount prefix: no leading `/`, exactly one trailing `/`, `""` for the bucket root.
pub fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    #[test]
    fn listed_keys_fit_s3s_limit() {
        let dir = format!("{}/", "d".repeat(1000));
        let name = |n: usize| "f".repeat(n);
        assert_eq!(
            check_listed(&format!("{dir}{}", name(23)), &name(23)),
            Ok(())
        );
        assert_eq!(
            check_listed(&format!("{dir}{}", name(24)), &name(24)),
            Err(InvalidName::KeyTooLong)
        );
        assert_eq!(check_listed("a/..", ".."), Err(InvalidName::DotDot));
    }

    proptest! {
        /// Whatever a key holds, a component accepted as a name can't leave its directory
        /// or be refused by the kernel.
        #[test]
        fn accepted_components_are_plain_names(name in ".{0,300}") {
            if check_component(&name).is_ok() {
                prop_assert!(!name.is_empty() && name != "." && name != "..");
                prop_assert!(!name.contains('/') && !name.contains('\0'));
                prop_assert!(name.len() <= NAME_MAX);
            }
        }
    }

    use super::*;

    #[test]
    fn components() {
        assert_eq!(check_component("a b+%é"), Ok(()));
        assert_eq!(check_component(""), Err(InvalidName::Empty));
        assert_eq!(check_component("."), Err(InvalidName::Dot));
        assert_eq!(check_component(".."), Err(InvalidName::DotDot));
        assert_eq!(check_component("a\0b"), Err(InvalidName::Nul));
        assert_eq!(check_component(&"x".repeat(255)), Ok(()));
        assert_eq!(check_component(&"x".repeat(256)), Err(InvalidName::TooLong));
        // 128 two-byte characters: 256 bytes.
        assert_eq!(check_component(&"é".repeat(128)), Err(InvalidName::TooLong));
    }

    #[test]
    fn keys() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
        assert_eq!(dir_key("", ""), "");
        assert_eq!(dir_key("p/", "a/b"), "p/a/b/");
        assert_eq!(normalize_prefix("/x/y/"), "x/y/");
        assert_eq!(normalize_prefix("x"), "x/");
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
    }
}
