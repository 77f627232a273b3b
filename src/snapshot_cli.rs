//! `keepfs snapshot create|list|delete|restore`: the command-line edge of
//! [`keepfs::snapshot`].

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use keepfs::cli::{SnapshotCommand, SnapshotLocation};
use keepfs::config::S3Url;
use keepfs::control::{self, MountRecord};
use keepfs::snapshot::restore::{self, Summary};
use keepfs::snapshot::{Progress, take};
use keepfs::store::{S3Store, S3StoreConfig};

/// Where the snapshots are, and the mount's cache directory when one was named.
struct Located {
    source: S3Url,
    config: S3StoreConfig,
    cache_dir: Option<PathBuf>,
}

impl Located {
    /// The store, its access checked (see [`S3Store::connect`]).
    fn store(&self, runtime: &tokio::runtime::Runtime) -> Result<S3Store> {
        runtime
            .block_on(S3Store::connect(&self.config, &self.source.prefix))
            .with_context(|| format!("reaching {}", self.source))
    }
}

fn locate(at: &SnapshotLocation) -> Result<Located> {
    let cache_dir = match (&at.cache_dir, &at.target) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(t)) if t.starts_with("s3://") => None,
        (None, Some(mountpoint)) => Some(keepfs::flush::cache_dir_of_mount(Path::new(mountpoint))?),
        (None, None) => bail!("give a MOUNTPOINT, s3://BUCKET[/PREFIX] or --cache-dir DIR"),
    };
    match cache_dir {
        Some(dir) => {
            let record = MountRecord::load(&dir).with_context(|| {
                format!(
                    "{} has no mount.json (written by a read-write keepfs mount)",
                    dir.display()
                )
            })?;
            Ok(Located {
                source: record.source.parse()?,
                config: record.store_config(),
                cache_dir: Some(dir),
            })
        }
        None => {
            let source: S3Url = at.target.as_deref().unwrap_or_default().parse()?;
            Ok(Located {
                config: store_config(&source, at),
                source,
                cache_dir: None,
            })
        }
    }
}

fn store_config(source: &S3Url, at: &SnapshotLocation) -> S3StoreConfig {
    S3StoreConfig {
        bucket: source.bucket.clone(),
        endpoint_url: at.endpoint_url.clone(),
        region: at.region.clone(),
        force_path_style: at.force_path_style,
        connect_timeout: Duration::from_secs(5),
        request_timeout: keepfs::store::DEFAULT_REQUEST_TIMEOUT,
    }
}

/// Shows [`Progress`] on a terminal (nothing otherwise: the summary line follows).
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar(Some(bar))
    }

    fn show(&self, p: &Progress) {
        let Some(bar) = &self.0 else { return };
        bar.set_length(p.bytes);
        bar.set_position(p.done_bytes);
        bar.set_message(if p.objects > 0 {
            format!("{} {}/{} objects", p.stage, p.done, p.objects)
        } else if p.done > 0 {
            format!("{} {} objects", p.stage, p.done)
        } else {
            p.stage.clone()
        });
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// Runs one `keepfs snapshot` command.
pub fn run(command: &SnapshotCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let started = Instant::now();
    match command {
        SnapshotCommand::Create { name, at, timeout } => {
            keepfs::snapshot::check_name(name)?;
            let located = locate(at)?;
            let summary = match located.cache_dir.as_deref().filter(|d| mount_runs(d)) {
                Some(dir) => through_mount(dir, name, *timeout)?,
                None => {
                    if let Some(dir) = &located.cache_dir {
                        // No mount: what its journal holds goes to S3 first.
                        keepfs::flush::flush(dir, *timeout)?;
                    } else {
                        eprintln!(
                            "keepfs snapshot: recording {} as it is now (no mount's writes are held; give its mount point for a consistent snapshot of a running mount)",
                            located.source
                        );
                    }
                    let bar = Bar::new();
                    let report = |p: Progress| bar.show(&p);
                    let store = located.store(&runtime)?;
                    let manifest = runtime.block_on(async {
                        take::check_absent(&store, &located.source.prefix, name).await?;
                        take::record(&store, &located.source, name, 0, Vec::new(), &report).await
                    })?;
                    Summary::from(&manifest)
                }
            };
            eprintln!(
                "keepfs snapshot: {name} of {} taken: {} objects, {:.1} MiB, {}; writes held {} ms; {:.1} s",
                located.source,
                summary.objects,
                summary.bytes as f64 / MIB,
                if summary.versioned {
                    "versions recorded (versioned bucket)"
                } else {
                    "copied under .keepfs/snapshots/"
                },
                summary.barrier_ms,
                started.elapsed().as_secs_f64()
            );
        }
        SnapshotCommand::List { at, json } => {
            let located = locate(at)?;
            let store = located.store(&runtime)?;
            let listed = runtime.block_on(restore::list(&store, &located.source))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
                return Ok(());
            }
            println!(
                "{:<32} {:<24} {:>9} {:>12} {:>8}  KIND",
                "NAME", "TAKEN (UTC)", "OBJECTS", "MIB", "HELD MS"
            );
            for s in listed {
                match s.manifest {
                    Some(m) => println!(
                        "{:<32} {:<24} {:>9} {:>12.1} {:>8}  {}",
                        s.name,
                        humantime::format_rfc3339_seconds(
                            keepfs::snapshot::manifest::from_unix_ms(m.taken_unix_ms)
                        ),
                        m.objects,
                        m.bytes as f64 / MIB,
                        m.barrier_ms,
                        if m.versioned { "versions" } else { "copies" }
                    ),
                    None => println!("{:<32} (incomplete: delete it)", s.name),
                }
            }
        }
        SnapshotCommand::Delete { name, at } => {
            let located = locate(at)?;
            let store = located.store(&runtime)?;
            let bar = Bar::new();
            let report = |p: Progress| bar.show(&p);
            let n = runtime.block_on(restore::delete(&store, &located.source, name, &report))?;
            drop(bar);
            eprintln!("keepfs snapshot: {name} deleted ({n} objects)");
        }
        SnapshotCommand::Restore {
            name,
            at,
            to,
            force,
        } => {
            let located = locate(at)?;
            let target: S3Url = match to {
                Some(to) => to.parse()?,
                None => located.source.clone(),
            };
            let store = located.store(&runtime)?;
            let into = if target.bucket == located.source.bucket {
                store.clone()
            } else {
                runtime
                    .block_on(S3Store::connect(
                        &S3StoreConfig {
                            bucket: target.bucket.clone(),
                            ..located.config.clone()
                        },
                        &target.prefix,
                    ))
                    .with_context(|| format!("reaching {target}"))?
            };
            let bar = Bar::new();
            let report = |p: Progress| bar.show(&p);
            let done = runtime.block_on(restore::restore(
                &store,
                &located.source,
                name,
                &into,
                &target,
                *force,
                &report,
            ))?;
            drop(bar);
            eprintln!(
                "keepfs snapshot: {name} restored into {target}: {} copied ({:.1} MiB), {} deleted; {:.1} s",
                done.copied,
                done.bytes as f64 / MIB,
                done.deleted,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Whether a mount owns cache directory `dir` (its control socket answers).
fn mount_runs(dir: &Path) -> bool {
    control::ask_status(dir).is_some()
}

/// Asks the mount owning `dir` to take snapshot `name`, showing its progress.
fn through_mount(dir: &Path, name: &str, timeout: Duration) -> Result<Summary> {
    let mut stream = UnixStream::connect(control::socket_path(dir))
        .with_context(|| format!("reaching the mount that owns {}", dir.display()))?;
    writeln!(stream, "snapshot {name} {}", timeout.as_millis())?;
    let bar = Bar::new();
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the mount's answer")?;
        let reply: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the mount answered {line:?}"))?;
        if let Some(progress) = reply.get("progress") {
            if let Ok(p) = serde_json::from_value::<Progress>(progress.clone()) {
                bar.show(&p);
            }
            continue;
        }
        if let Some(error) = reply.get("error").and_then(|e| e.as_str()) {
            return Err(anyhow!("{error}"));
        }
        if let Some(summary) = reply.get("snapshot") {
            return Ok(serde_json::from_value(summary.clone())?);
        }
    }
    Err(anyhow!(
        "the mount closed the connection before the snapshot was taken (see its log)"
    ))
}
