//! `hexz-host`: build, inspect and (later) serve snapshots.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use hexz_host::pack::{pack, PackInput, Progress};
use hexz_host::snapshot::format::Codec;
use hexz_host::snapshot::{Compression, NodeKind, Snapshot, WriterOptions};

mod cli_fmt;
mod mount_cmd;

#[derive(Parser)]
#[command(
    name = "hexz-host",
    version,
    about = "Snapshot-backed workspaces for microVM sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    Zstd,
    Lz4,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pack a directory tree and/or raw streams into a snapshot file.
    Pack {
        /// Directory to pack (omit for a stream-only snapshot).
        src: Option<PathBuf>,
        /// Output snapshot (written atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Raw disk image to store as the `disk` stream.
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Raw memory image to store as the `memory` stream.
        #[arg(long)]
        memory: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "zstd")]
        compression: CompressionArg,
        /// zstd level (1-22; default 3). Ignored for lz4.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        /// Compression threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Number the files 1, 2, 3... instead of keeping the inode numbers they have
        /// (by default they keep them, so git's index stays valid in every mount; with
        /// this flag the snapshot depends only on the tree's contents and metadata).
        #[arg(long)]
        sequential_inodes: bool,
    },
    /// Describe a snapshot.
    Info {
        snapshot: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Read and check every chunk; exit 0 only if the snapshot is intact.
    Verify { snapshot: PathBuf },
    /// List a directory (or one entry) of the snapshot's tree.
    Ls {
        snapshot: PathBuf,
        #[arg(default_value = "/")]
        path: String,
    },
    /// Write a file of the tree, or a stream (`disk`, `memory`), to stdout.
    Cat {
        snapshot: PathBuf,
        path: String,
        /// Treat PATH as a stream name even if the tree has such a file.
        #[arg(long)]
        stream: bool,
    },
    /// Recreate the snapshot's tree, with all metadata, in a new or empty directory.
    Extract { snapshot: PathBuf, dest: PathBuf },
    /// Fold an overlay into a new snapshot.
    Commit {
        snapshot: PathBuf,
        #[arg(long)]
        overlay: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Copy every chunk instead of referring to the base snapshot's.
        #[arg(long)]
        standalone: bool,
    },
    /// Serve the snapshot plus a copy-on-write overlay over the hexz protocol.
    Serve(ServeArgs),
    /// What changed: a snapshot and its overlay (`--overlay DIR`), or two snapshots.
    /// Lines `A|C|D PATH`; reads indexes and overlay records only, never file data.
    Diff {
        snapshot: PathBuf,
        /// A second snapshot to compare with the first.
        other: Option<PathBuf>,
        /// An overlay of SNAPSHOT to compare with it.
        #[arg(long, conflicts_with = "other")]
        overlay: Option<PathBuf>,
        /// One JSON array of {change, path, kind, old_size, new_size, content, metadata}.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in /workspace of a fresh microVM booted on the snapshot; exits with
    /// the command's status (124 timeout, 125 sandbox failure, 126/127 not executable/not
    /// found).
    Run(RunArgs),
    /// The guest image (kernel + initramfs) that `run` and `serve --vm` boot.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Memory templates: a booted, saved guest that `run` restores instead of booting.
    Template {
        #[command(subcommand)]
        cmd: TemplateCmd,
    },
    /// Mount the snapshot's tree (plus an overlay) with FUSE on this host.
    Mount(mount_cmd::MountArgs),
    /// Serve a raw stream (`disk`, `memory`) as an NBD export (loopback or Unix socket).
    Nbd(hexz_host::nbd::command::NbdArgs),
    /// Upload a snapshot, with its chain of bases, to an OCI registry as an artifact;
    /// blobs the repository already has are not sent again. Every command that takes a
    /// snapshot also opens `oci://REGISTRY/REPO:TAG` lazily.
    Push {
        /// A snapshot file (or an oci:// reference, to copy or re-tag it).
        snapshot: PathBuf,
        /// REGISTRY/REPO:TAG, e.g. localhost:5000/team/workspace:v1.
        reference: String,
        /// Plain HTTP to a registry that is not on loopback (loopback always uses it).
        #[arg(long)]
        plain_http: bool,
        /// Another repository of the same registry to link existing blobs from.
        #[arg(long = "mount-from", value_name = "REPO")]
        mount_from: Vec<String>,
    },
    /// Download a snapshot, with its chain of bases, from an OCI registry.
    Pull {
        /// REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:DIGEST.
        reference: String,
        /// The snapshot file to write; bases go beside it.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        plain_http: bool,
    },
    /// The host's cache of chunks and indexes read from registries.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Where the cache is, what it holds and its bound (HEXZ_OCI_CACHE_BYTES).
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Remove least recently used entries until the cache holds at most SIZE (e.g. 2G).
    Prune {
        #[arg(long, value_name = "SIZE")]
        max: String,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Download the Debian cloud kernel (once, with apt-get) and build the initramfs into
    /// the cache ($XDG_CACHE_HOME/hexz/images/<hash>/); prints the two paths.
    Build {
        /// Directory holding the static hexz-init and hexz-guestfused (default: the cargo
        /// musl release directory beside this binary's target directory).
        #[arg(long)]
        guest_bin_dir: Option<PathBuf>,
        /// Add a host program and the libraries it loads, e.g. `--with git` (repeatable;
        /// `run --with` picks the same image).
        #[arg(long = "with", value_name = "PROGRAM")]
        with: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Boot the guest image once to where its init waits for work, save the machine, and
    /// keep it in the cache ($XDG_CACHE_HOME/hexz/templates/<key>/, keyed on the image,
    /// the QEMU binary, --memory and --cpus); `run` then restores it. Does nothing when an
    /// up-to-date template exists. Prints the template's directory.
    Build {
        /// Write the template to this directory instead of the cache (`run --template`).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Guest memory (512M, 1G).
        #[arg(long, default_value = "512M", value_parser = hexz_host::vm::sandbox::parse_memory_mib)]
        memory: u64,
        /// Guest CPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long, value_enum, default_value = "auto")]
        accel: hexz_host::vm::sandbox::AccelChoice,
        /// Directory of the static guest binaries for an image built on demand.
        #[arg(long)]
        guest_bin_dir: Option<PathBuf>,
    },
}

/// How the microVM is built and booted (`run`, `serve --vm`).
#[derive(clap::Args)]
struct VmArgs {
    /// Guest memory (512M, 1G).
    #[arg(long, default_value = "512M", value_parser = hexz_host::vm::sandbox::parse_memory_mib)]
    memory: u64,
    /// Guest CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Kernel to boot instead of the cached image's (needs --initrd).
    #[arg(long, requires = "initrd")]
    kernel: Option<PathBuf>,
    /// Initramfs to boot instead of the cached image's (needs --kernel).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Directory of the static guest binaries for an image built on demand.
    #[arg(long)]
    guest_bin_dir: Option<PathBuf>,
    /// Add a host program (a name on PATH, or a path) and the libraries it loads to the
    /// guest image, e.g. `--with git` (repeatable; each set of programs is its own
    /// cached image).
    #[arg(long = "with", value_name = "PROGRAM", conflicts_with = "kernel")]
    with: Vec<String>,
    /// auto: KVM + vhost-vsock when /dev/kvm works and /dev/vhost-vsock exists, else
    /// TCG + vhost-device-vsock.
    #[arg(long, value_enum, default_value = "auto")]
    accel: hexz_host::vm::sandbox::AccelChoice,
    /// Keep the guest's serial console in this file (default: a temporary file, shown
    /// when the sandbox fails).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Do not say which accelerator and vsock transport were picked.
    #[arg(short, long)]
    quiet: bool,
    /// Raw stream to attach as the guest's /dev/vda (default: the `disk` stream when the
    /// snapshot has one). Writes go to a block overlay, STREAM.cow in --overlay's
    /// directory (else in the run's temporary directory).
    #[arg(long, value_name = "STREAM", conflicts_with = "no_disk")]
    disk: Option<String>,
    /// Attach no disk, even when the snapshot has a `disk` stream.
    #[arg(long)]
    no_disk: bool,
}

impl VmArgs {
    fn options(
        self,
        snapshot: PathBuf,
        overlay: Option<PathBuf>,
        cache_mib: u64,
    ) -> hexz_host::vm::sandbox::VmOptions {
        use hexz_host::vm::disk::DiskChoice;
        use hexz_host::vm::sandbox::{ImageChoice, VmOptions};
        let image = match (self.kernel, self.initrd) {
            (Some(kernel), Some(initrd)) => {
                ImageChoice::Given(hexz_host::vm::image::Image { kernel, initrd })
            }
            _ => ImageChoice::Cached {
                guest_bin_dir: self.guest_bin_dir,
                programs: self.with,
            },
        };
        VmOptions {
            snapshot,
            overlay,
            memory_mib: self.memory,
            cpus: self.cpus,
            image,
            accel: self.accel,
            console_log: self.console_log,
            cache_mib,
            quiet: self.quiet,
            template: hexz_host::vm::sandbox::TemplateChoice::Auto,
            disk: match (self.disk, self.no_disk) {
                (_, true) => DiskChoice::None,
                (Some(stream), false) => DiskChoice::Stream(stream),
                (None, false) => DiskChoice::Auto,
            },
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The snapshot whose tree becomes /workspace.
    snapshot: PathBuf,
    /// Persistent overlay directory (created if missing); `commit` folds it into a new
    /// snapshot. Without it: an ephemeral overlay per run, removed at the end.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Stop the VM after this long, boot included (30s, 500ms, 2m); exit status 124.
    #[arg(long, value_name = "DUR", value_parser = hexz_host::vm::sandbox::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    env: Vec<std::ffi::OsString>,
    /// Working directory, relative to /workspace.
    #[arg(long, default_value = ".")]
    workdir: String,
    /// Run as UID[:GID] (default root).
    #[arg(long, value_name = "UID[:GID]", value_parser = hexz_host::vm::sandbox::parse_user)]
    user: Option<(u32, u32)>,
    /// Decompressed-frame cache, MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// Restore this memory template (`template build -o DIR`) instead of booting, with
    /// its own memory and CPUs; refused when stale or corrupt. Default: the cached
    /// template for this image, QEMU, --memory and --cpus when `template build` made one,
    /// else a cold boot.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cold", "kernel"])]
    template: Option<PathBuf>,
    /// Boot the guest even when a memory template exists.
    #[arg(long)]
    cold: bool,
    #[command(flatten)]
    vm: VmArgs,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
struct ServeArgs {
    snapshot: PathBuf,
    /// Persistent overlay directory (created if missing). Without it: an ephemeral
    /// overlay removed on exit.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Refuse every change with EROFS; create nothing.
    #[arg(long)]
    read_only: bool,
    /// vsock:CID:PORT (accepts only that VM) | vsock-uds:PATH[:PORT] (listens on PATH_PORT) |
    /// unix:PATH | tcp:127.0.0.1:PORT.
    /// Repeat for several listeners.
    #[arg(
        long = "listen",
        required_unless_present = "vm",
        conflicts_with = "vm",
        value_parser = hexz_host::server::parse_listen
    )]
    listen: Vec<hexz_host::server::ListenAddr>,
    /// Boot a microVM on the snapshot with /workspace mounted, and give its console (a
    /// shell in /workspace) to this terminal; the VM stops when the shell exits.
    #[arg(long)]
    vm: bool,
    /// With --vm: no console; the VM runs until Ctrl-C/SIGTERM (console in --console-log).
    #[arg(long, requires = "vm")]
    no_console: bool,
    #[command(flatten)]
    vm_args: VmArgs,
    /// Decompressed-frame cache, MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// How long clients may cache entries and attributes, seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u32,
    /// Requests in flight per connection (at most).
    #[arg(long, default_value_t = 256)]
    max_in_flight: u32,
    /// Space the overlay may take (upper files + journal), e.g. 512M, 10G; past it
    /// changes fail with ENOSPC. Default: no limit but the disk's.
    #[arg(long, value_parser = cli_fmt::parse_size)]
    overlay_size: Option<u64>,
    /// Connections served at once; more are refused (logged).
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a new connection has to send its hello before it is closed.
    #[arg(long, default_value_t = 10)]
    hello_timeout: u64,
    /// Seconds a reply may wait for the client to read it before the connection is closed.
    #[arg(long, default_value_t = 30)]
    send_timeout: u64,
    /// Seconds after start during which reconnecting clients may retain nameless
    /// (unlinked but open) nodes; then unreferenced ones are removed.
    #[arg(long, default_value_t = 30)]
    orphan_grace: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs connections by default; the one-shot commands only warnings.
    let default = if matches!(cli.cmd, Cmd::Serve(_) | Cmd::Mount(_) | Cmd::Nbd(_)) {
        "info,fuser::mnt=error"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("hexz-host: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Pack {
            src,
            output,
            disk,
            memory,
            compression,
            level,
            threads,
            sequential_inodes,
        } => {
            let mut input = PackInput {
                tree: src,
                streams: Vec::new(),
                sequential_inodes,
            };
            input.streams.extend(disk.map(|p| ("disk".to_string(), p)));
            input
                .streams
                .extend(memory.map(|p| ("memory".to_string(), p)));
            if input.tree.is_none() && input.streams.is_empty() {
                bail!("nothing to pack: give a source directory, --disk or --memory");
            }
            let compression = match compression {
                CompressionArg::Zstd => Compression::Zstd { level },
                CompressionArg::Lz4 => Compression::Lz4,
            };
            let opts = WriterOptions {
                compression,
                threads,
            };
            let bar = ProgressBar::new();
            let start = Instant::now();
            let s = pack(&input, &output, &opts, &bar)
                .with_context(|| format!("packing failed, {} not written", output.display()))?;
            bar.finish();
            let st = &s.stats;
            println!(
                "packed {} files, {} dirs, {} symlinks, {} other: {} in, {} out ({:.2}x), dedup saved {}, zeros {}, {:.2} s -> {}",
                s.files,
                s.dirs,
                s.symlinks,
                s.others,
                cli_fmt::bytes(st.bytes_in),
                cli_fmt::bytes(st.file_len),
                st.bytes_in as f64 / st.file_len.max(1) as f64,
                cli_fmt::bytes(st.bytes_deduped),
                cli_fmt::bytes(st.bytes_zero),
                start.elapsed().as_secs_f64(),
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Info { snapshot, json } => {
            let snap = Snapshot::open(&snapshot)?;
            let info = cli_fmt::Info::of(&snap);
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { snapshot } => verify(&snapshot),
        Cmd::Ls { snapshot, path } => {
            let snap = Snapshot::open(&snapshot)?;
            let idx = snap.resolve(&path)?;
            let out = std::io::stdout();
            let mut out = out.lock();
            match &snap.node(idx).map(|n| &n.kind) {
                Some(NodeKind::Dir(d)) => {
                    for e in &d.entries {
                        if let Some(n) = snap.node(e.node) {
                            writeln!(out, "{}", cli_fmt::ls_line(n, &e.name))?;
                        }
                    }
                }
                Some(_) => {
                    let name = path.rsplit('/').find(|p| !p.is_empty()).unwrap_or(&path);
                    if let Some(n) = snap.node(idx) {
                        writeln!(out, "{}", cli_fmt::ls_line(n, name.as_bytes()))?;
                    }
                }
                None => bail!("no such node"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cat {
            snapshot,
            path,
            stream,
        } => {
            let snap = Snapshot::open(&snapshot)?;
            let data = if stream || (snap.resolve(&path).is_err() && snap.stream(&path).is_some()) {
                &snap
                    .stream(&path)
                    .with_context(|| format!("no stream named '{path}' in this snapshot"))?
                    .data
            } else {
                let idx = cli_fmt::resolve_following(&snap, &path)?;
                match snap.node(idx).map(|n| &n.kind) {
                    Some(NodeKind::File(d)) => d,
                    Some(NodeKind::Dir(_)) => bail!("{path}: is a directory"),
                    _ => bail!("{path}: not a regular file"),
                }
            };
            let out = std::io::stdout();
            let mut out = out.lock();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < data.size {
                let n = snap.read_at(data, off, &mut buf)?;
                out.write_all(&buf[..n])?;
                off += n as u64;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Commit {
            snapshot,
            overlay,
            output,
            standalone,
        } => {
            let start = Instant::now();
            let opts = hexz_host::commit::CommitOptions {
                standalone,
                ..Default::default()
            };
            let st = hexz_host::commit::commit(&snapshot, &overlay, &output, &opts)
                .with_context(|| format!("commit failed, {} not written", output.display()))?;
            println!(
                "committed {} -> {}: {} logical, {} new data stored, {} shared with the base, {} file, {:.2} s",
                overlay.display(),
                output.display(),
                cli_fmt::bytes(st.bytes_in),
                cli_fmt::bytes(st.bytes_unique),
                cli_fmt::bytes(st.bytes_in_base),
                cli_fmt::bytes(st.file_len),
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve(args) => serve(args),
        Cmd::Diff {
            snapshot,
            other,
            overlay,
            json,
        } => {
            let a = Snapshot::open(&snapshot)?;
            let entries = match (other, overlay) {
                (Some(b), None) => hexz_host::diff::snapshots(&a, &Snapshot::open(&b)?)?,
                (None, Some(ov)) => hexz_host::diff::overlay(std::sync::Arc::new(a), &ov)?,
                _ => anyhow::bail!("diff needs a second snapshot or --overlay DIR"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", hexz_host::diff::render(&entries));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(args) => {
            let RunArgs {
                snapshot,
                overlay,
                timeout,
                env,
                workdir,
                user,
                cache_mib,
                template,
                cold,
                vm,
                command,
            } = args;
            use hexz_host::vm::sandbox::TemplateChoice;
            let (uid, gid) = user.unwrap_or((0, 0));
            let given_image = vm.kernel.is_some();
            let mut opts = vm.options(snapshot, overlay, cache_mib);
            opts.template = match (template, cold || given_image) {
                (Some(dir), _) => TemplateChoice::Given(dir),
                (None, true) => TemplateChoice::Cold,
                (None, false) => TemplateChoice::Auto,
            };
            let spec = hexz_host::vm::exec::CommandSpec {
                argv: command,
                env,
                workdir,
                uid,
                gid,
                timeout,
            };
            let code = hexz_host::vm::exec::run_command(&opts, &spec);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(125)))
        }
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    guest_bin_dir,
                    with,
                },
        } => {
            use hexz_host::vm::image;
            let cache = image::cache_dir();
            let mut bins = image::find_guest_binaries(guest_bin_dir.as_deref())?;
            bins.programs = with
                .iter()
                .map(|p| hexz_host::vm::programs::Program::find(p))
                .collect::<Result<_, _>>()?;
            let kernel = image::fetch_kernel(&cache)?;
            let built = image::build(&cache, &kernel, &bins)?;
            println!("kernel {}", built.kernel.display());
            println!("initrd {}", built.initrd.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Template {
            cmd:
                TemplateCmd::Build {
                    output,
                    memory,
                    cpus,
                    accel,
                    guest_bin_dir,
                },
        } => {
            use hexz_host::vm::template;
            let opts = template::build_options(memory, cpus, accel, guest_bin_dir);
            let started = Instant::now();
            let (dir, built) = template::build(&opts, output.as_deref())?;
            if built {
                eprintln!(
                    "hexz-host: template built in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            } else {
                eprintln!("hexz-host: template is up to date");
            }
            println!("{}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Mount(args) => mount_cmd::run(args),
        Cmd::Nbd(args) => {
            hexz_host::nbd::command::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Push {
            snapshot,
            reference,
            plain_http,
            mount_from,
        } => {
            let start = Instant::now();
            let snap = Snapshot::open(&snapshot)?;
            let opts = hexz_host::oci::push::PushOptions {
                plain_http,
                mount_from,
            };
            let st = hexz_host::oci::push::push(&snap, &reference, &opts)
                .with_context(|| format!("push to {reference} failed"))?;
            println!(
                "pushed {} ({} snapshot{}): {} blob{} uploaded ({}), {} linked from other repositories ({}), {} already there ({}), {:.2} s",
                st.pinned,
                st.snapshots,
                if st.snapshots == 1 { "" } else { "s" },
                st.uploaded,
                if st.uploaded == 1 { "" } else { "s" },
                cli_fmt::bytes(st.uploaded_bytes),
                st.mounted,
                cli_fmt::bytes(st.mounted_bytes),
                st.present,
                cli_fmt::bytes(st.present_bytes),
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pull {
            reference,
            output,
            plain_http,
        } => {
            let start = Instant::now();
            let st = hexz_host::oci::pull::pull(&reference, &output, plain_http)
                .with_context(|| format!("pull of {reference} failed"))?;
            let names = |v: &[PathBuf]| {
                v.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "pulled {} -> {}: {} ({}){}, {:.2} s",
                st.pinned,
                output.display(),
                names(&st.written),
                cli_fmt::bytes(st.bytes),
                if st.kept.is_empty() {
                    String::new()
                } else {
                    format!("; kept {}", names(&st.kept))
                },
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cache { cmd } => {
            use hexz_host::oci::cache::{parse_size, HostCache};
            let cache = HostCache::shared()?;
            match cmd {
                CacheCmd::Info { json } => {
                    let u = cache.usage();
                    if json {
                        let mut v = serde_json::to_value(u)?;
                        v["path"] = cache.root().display().to_string().into();
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        println!("path    {}", cache.root().display());
                        println!(
                            "data    {} blob{} ({} on disk)",
                            u.data_blobs,
                            if u.data_blobs == 1 { "" } else { "s" },
                            cli_fmt::bytes(u.data_bytes)
                        );
                        println!(
                            "indexes {} manifests and index blobs ({})",
                            u.blobs,
                            cli_fmt::bytes(u.blob_bytes)
                        );
                        println!("bound   {} (HEXZ_OCI_CACHE_BYTES)", cli_fmt::bytes(u.limit));
                    }
                }
                CacheCmd::Prune { max } => {
                    let limit = parse_size(&max).with_context(|| {
                        format!("--max {max}: not a size (bytes, or with K, M, G, T)")
                    })?;
                    let freed = cache.evict_down(limit, limit)?;
                    println!("removed {}", cli_fmt::bytes(freed));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Extract { snapshot, dest } => {
            let snap = Snapshot::open(&snapshot)?;
            let start = Instant::now();
            let n = hexz_host::extract::extract(&snap, &dest)
                .with_context(|| format!("extract into {} stopped", dest.display()))?;
            println!(
                "extracted {n} entries in {:.2} s -> {}",
                start.elapsed().as_secs_f64(),
                dest.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let ServeArgs {
        snapshot,
        overlay,
        read_only,
        listen,
        vm,
        no_console,
        vm_args,
        cache_mib,
        ttl,
        max_in_flight,
        overlay_size,
        max_connections,
        hello_timeout,
        send_timeout,
        orphan_grace,
    } = args;
    if vm {
        if read_only {
            bail!("--vm with --read-only is not supported yet");
        }
        let opts = vm_args.options(snapshot, overlay, cache_mib);
        let code = hexz_host::vm::sandbox::serve_vm(&opts, !no_console);
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(125)));
    }
    use std::sync::Arc;
    let snap = Arc::new(Snapshot::open_with_cache(&snapshot, cache_mib << 20)?);
    let opts = hexz_host::vfs::VfsOptions {
        read_only,
        overlay_size,
    };
    let vfs = Arc::new(hexz_host::vfs::Vfs::with_options(
        snap,
        overlay.as_deref(),
        opts,
    )?);
    let mut cfg = hexz_host::server::ServerConfig {
        ttl_ms: ttl.saturating_mul(1000),
        max_connections: max_connections.max(1),
        hello_timeout: std::time::Duration::from_secs(hello_timeout.max(1)),
        send_timeout: std::time::Duration::from_secs(send_timeout.max(1)),
        orphan_grace: std::time::Duration::from_secs(orphan_grace),
        ..Default::default()
    };
    cfg.limits.max_in_flight = max_in_flight.max(1);
    let overlay_desc = match (&overlay, read_only) {
        (Some(d), _) => d.display().to_string(),
        (None, true) => "none, read-only".into(),
        (None, false) => "ephemeral".into(),
    };
    let listeners = listen
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let wait = hexz_host::server::shutdown_on_signal()?;
    hexz_host::server::serve(vfs, &listen, cfg, || {
        println!(
            "serving {} (overlay: {overlay_desc}) on {listeners}",
            snapshot.display()
        );
        let _ = std::io::stdout().flush();
        wait()
    })?;
    Ok(ExitCode::SUCCESS)
}

fn verify(path: &PathBuf) -> anyhow::Result<ExitCode> {
    let snap = Snapshot::open(path)?;
    let frames = snap.index().frames.len();
    let bar = ProgressBar::new();
    bar.set_total(frames as u64);
    let mut bad = 0usize;
    let mut bytes = 0u64;
    for i in 0..frames {
        match snap.load_frame(i as u32) {
            Ok(raw) => bytes += raw.len() as u64,
            Err(e) => {
                bad += 1;
                eprintln!("hexz-host: {}: {e}", path.display());
            }
        }
        bar.advance(1);
    }
    bar.finish();
    if bad > 0 {
        eprintln!(
            "hexz-host: {}: FAILED: {bad} of {frames} frames are damaged",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let codecs = snap
        .index()
        .frames
        .iter()
        .filter(|f| f.codec != Codec::Raw as u8)
        .count();
    println!(
        "{}: OK: {frames} frames ({codecs} compressed), {} chunks, {} verified, id {}",
        path.display(),
        snap.index().chunks.len(),
        cli_fmt::bytes(bytes),
        snap.id_hex()
    );
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal; nothing otherwise.
struct ProgressBar(Option<indicatif::ProgressBar>);

impl ProgressBar {
    fn new() -> ProgressBar {
        if !std::io::stderr().is_terminal() {
            return ProgressBar(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        ProgressBar(Some(bar))
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Progress for ProgressBar {
    fn set_total(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.set_length(bytes);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
}
