use std::process::ExitCode;

use clap::Parser;
use keepfs::cli::{Cli, Command};
use keepfs::mount::{DAEMON_CHILD_ENV, daemonize, run};

mod snapshot_cli;

// Cache blocks are allocated on one thread and freed on another, 256 KiB at a time. With
// glibc's default malloc, 4 readers through a full 1 GiB block cache ran at 390 MB/s with 5.4 s
// of system time per 4 GiB (fresh pages faulted in for every block); jemalloc reuses the memory
// and ran at 560-610 MB/s on the same run.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once before the first allocation (jemalloc(3), "malloc_conf";
/// `_rjem_` is tikv-jemalloc-sys's symbol prefix; `_RJEM_MALLOC_CONF` in the environment still
/// overrides). Freed pages go back to the kernel after 1 s without reuse, by jemalloc's own
/// thread, instead of after the default 10 s: `--memory-limit` bounds resident memory, and
/// with the default, 16 readers and 16 writers peaked 15-30 MiB higher on pages freed seconds
/// earlier (tests/memory.rs). Memory that is reused at once (cache blocks) is not affected.
// SAFETY: jemalloc reads this as a `const char *` to a NUL-terminated string; `&u8` has that
// layout and points at the first byte of a static, NUL-terminated literal.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = if keepfs::helper::is_helper_call(&argv) {
        // mount(8), fstab, mount.fuse3: see src/helper.rs.
        match keepfs::helper::translate(&argv) {
            Ok(keepfs::helper::HelperCall::Mount(args)) => Cli::parse_from(args),
            Ok(keepfs::helper::HelperCall::Fake) => return ExitCode::SUCCESS,
            Err(e) => return fail(&e.to_string()),
        }
    } else {
        Cli::parse_from(argv)
    };
    match cli.command {
        Command::Status(args) => status(&args),
        Command::Flush(args) => flush(&args),
        Command::Snapshot(command) => {
            keepfs::logging::init("warn", keepfs::config::LogFormat::Text);
            match snapshot_cli::run(&command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("snapshot: {e:#}")),
            }
        }
        Command::Mount(args) => {
            let config = match args.to_config() {
                Ok(config) => config,
                Err(e) => return fail(&format!("invalid arguments: {e}")),
            };
            if args.daemon && std::env::var_os(DAEMON_CHILD_ENV).is_none() {
                return match daemonize() {
                    Ok(0) => ExitCode::SUCCESS,
                    Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                    Err(e) => fail(&format!("could not start in the background: {e}")),
                };
            }
            keepfs::logging::init(&args.log_level, args.log_format);
            let what = format!("{} at {}", config.source, config.mountpoint.display());
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!(
                    "could not mount {what}: {}",
                    anyhow::Error::from(e)
                )),
            }
        }
    }
}

fn status(args: &keepfs::cli::StatusArgs) -> ExitCode {
    match keepfs::status::read(&args.cache_dir) {
        Ok(status) if args.json => match serde_json::to_string_pretty(&status) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("could not encode the status: {e}")),
        },
        Ok(status) => {
            print!("{}", keepfs::status::render(&status));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn flush(args: &keepfs::cli::FlushArgs) -> ExitCode {
    keepfs::logging::init("warn", keepfs::config::LogFormat::Text);
    let dir = match (&args.cache_dir, &args.mountpoint) {
        (Some(dir), _) => dir.clone(),
        (None, Some(mountpoint)) => match keepfs::flush::cache_dir_of_mount(mountpoint) {
            Ok(dir) => dir,
            Err(e) => return fail(&e.to_string()),
        },
        (None, None) => return fail("give a MOUNTPOINT or --cache-dir DIR"),
    };
    match keepfs::flush::flush(&dir, args.timeout) {
        Ok(done) => {
            eprintln!(
                "keepfs flush: {} file(s), {} bytes uploaded; nothing pending in {} ({:.1} s)",
                done.files,
                done.bytes,
                dir.display(),
                done.elapsed.as_secs_f64()
            );
            if done.still_open > 0 {
                eprintln!(
                    "keepfs flush: {} file(s) still open for writing are uploaded after their last close",
                    done.still_open
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("flush of {}: {e}", dir.display())),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("keepfs: {message}");
    ExitCode::FAILURE
}
