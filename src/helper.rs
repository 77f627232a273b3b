//! keepfs as a mount helper, for `mount -t fuse.keepfs`, fstab and systemd mount units.
//!
//! mount(8) runs the helper of type `fuse.keepfs` as
//! `/sbin/mount.fuse.keepfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]` (mount(8), "External
//! helpers"); libfuse's `mount.fuse3` runs an fstab entry of type `fuse` with source
//! `keepfs#SOURCE` as `keepfs SOURCE MOUNTPOINT -o OPTIONS`. Both become
//! `keepfs mount SOURCE MOUNTPOINT --daemon ...`: each option `name=value` is the flag
//! `--name=value` (underscores as dashes), `name` alone is `--name`, `ro` is `--read-only`;
//! options meant for mount(8) itself or for systemd are ignored. The helper returns once the
//! mount is ready, as mount(8) expects.

use std::ffi::{OsStr, OsString};

/// Options mount(8), fstab and systemd use for themselves; keepfs ignores them.
const GENERIC: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "sync",
    "async",
    "loop",
];

/// An argument list keepfs can't take as a mount helper.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelperError {
    #[error("usage: mount.fuse.keepfs s3://BUCKET[/PREFIX] MOUNTPOINT [-o OPTIONS]")]
    Usage,
    #[error("mount helper option {0} is not supported")]
    Unsupported(String),
    #[error("mount helper arguments must be UTF-8")]
    NotUtf8,
}

/// Whether keepfs was started as a mount helper: as `mount.fuse.keepfs` / `mount.keepfs`, or
/// with an `s3://` source where a subcommand would be (libfuse's `mount.fuse3`).
pub fn is_helper_call(argv: &[OsString]) -> bool {
    let name = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .unwrap_or_default();
    name == OsStr::new("mount.fuse.keepfs")
        || name == OsStr::new("mount.keepfs")
        || argv
            .get(1)
            .and_then(|a| a.to_str())
            .is_some_and(|a| a.starts_with("s3://"))
}

/// What a mount helper call asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum HelperCall {
    /// `keepfs mount ...` with these arguments (program name first).
    Mount(Vec<OsString>),
    /// `-f` (fake): everything but the mount; nothing to do.
    Fake,
}

/// Translates a mount helper call (`argv` with the program name first) into `keepfs mount`.
pub fn translate(argv: &[OsString]) -> Result<HelperCall, HelperError> {
    let mut args = argv
        .iter()
        .skip(1)
        .map(|a| a.to_str().ok_or(HelperError::NotUtf8));
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut fake = false;
    while let Some(arg) = args.next() {
        let arg = arg?;
        match arg {
            "-o" => options.push(args.next().ok_or(HelperError::Usage)??.to_owned()),
            // -t TYPE repeats what the helper's name says; -n (no mtab), -v, -s (sloppy).
            "-t" => {
                args.next().ok_or(HelperError::Usage)??;
            }
            "-n" | "-v" | "-s" => {}
            "-f" => fake = true,
            a if a.starts_with("-o") => options.push(a[2..].to_owned()),
            a if a.starts_with('-') => return Err(HelperError::Unsupported(a.to_owned())),
            a => positional.push(a.to_owned()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        return Err(HelperError::Usage);
    };
    let mut out: Vec<OsString> = vec![
        argv[0].clone(),
        "mount".into(),
        source.into(),
        mountpoint.into(),
        "--daemon".into(),
    ];
    for option in options.iter().flat_map(|o| o.split(',')) {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (option, None),
        };
        if name.is_empty() || GENERIC.contains(&name) || name.starts_with("x-") || name == "comment"
        {
            continue;
        }
        let flag = match (name, value) {
            ("ro", None) => "--read-only".to_owned(),
            (name, None) => format!("--{}", name.replace('_', "-")),
            (name, Some(value)) => format!("--{}={value}", name.replace('_', "-")),
        };
        out.push(flag.into());
    }
    Ok(if fake {
        HelperCall::Fake
    } else {
        HelperCall::Mount(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn fstab_options_become_flags() {
        let argv = os(&[
            "/sbin/mount.fuse.keepfs",
            "s3://b/p",
            "/mnt/data",
            "-o",
            "rw,_netdev,nofail,x-systemd.automount,allow_other,cache_dir=/var/cache/k,endpoint_url=http://127.0.0.1:9000,force_path_style",
        ]);
        assert!(is_helper_call(&argv));
        assert_eq!(
            translate(&argv).unwrap(),
            HelperCall::Mount(os(&[
                "/sbin/mount.fuse.keepfs",
                "mount",
                "s3://b/p",
                "/mnt/data",
                "--daemon",
                "--allow-other",
                "--cache-dir=/var/cache/k",
                "--endpoint-url=http://127.0.0.1:9000",
                "--force-path-style",
            ]))
        );
        // libfuse's mount.fuse3 calls the program itself with the source first.
        let argv = os(&["keepfs", "s3://b", "/m", "-o", "ro", "-n"]);
        assert!(is_helper_call(&argv));
        assert_eq!(
            translate(&argv).unwrap(),
            HelperCall::Mount(os(&[
                "keepfs",
                "mount",
                "s3://b",
                "/m",
                "--daemon",
                "--read-only"
            ]))
        );
        assert_eq!(
            translate(&os(&["k", "s3://b", "/m", "-f"])).unwrap(),
            HelperCall::Fake
        );
        assert!(!is_helper_call(&os(&["keepfs", "mount", "s3://b", "/m"])));
        assert_eq!(translate(&os(&["k", "s3://b"])), Err(HelperError::Usage));
        assert_eq!(
            translate(&os(&["k", "s3://b", "/m", "-N", "ns"])),
            Err(HelperError::Unsupported("-N".into()))
        );
    }
}
