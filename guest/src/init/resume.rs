//! Template mode (`hexz.mode=template`): the guest talks to the host over virtio-serial
//! ports instead of vsock (QEMU cannot migrate a vhost-user vsock device), says it is
//! parked so the host can save the machine, and on restore takes fresh entropy and the
//! wall clock from the host before anything else runs (docs/PROTOCOL.md §12.4).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hexz_protocol::exec::{GuestMsg, HostMsg};

use crate::command;

/// The virtio-serial port names the host gives the two channels.
pub const EXEC_PORT: &str = "hexz.exec";
pub const FS_PORT: &str = "hexz.fs";

/// The character device of the virtio-serial port called `name`, waiting (bounded) for
/// the driver to announce it (ports are added asynchronously after the module loads).
pub fn port(name: &str, limit: Duration) -> anyhow::Result<PathBuf> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in dir.flatten() {
                let named = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                let dev = PathBuf::from("/dev").join(entry.file_name());
                if named.trim() == name && dev.exists() {
                    return Ok(dev);
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no virtio-serial port named {name} appeared within {} s",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads from a virtio port, waiting while no host is connected (a read then returns 0
/// at once, which is not an end of stream here).
struct WaitForHost<'a>(&'a File);

impl Read for WaitForHost<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match (&mut &*self.0).read(buf) {
                Ok(0) if !buf.is_empty() => std::thread::sleep(Duration::from_millis(10)),
                r => return r,
            }
        }
    }
}

/// Says `Parked` on the exec port and waits — across the save and restore — for the
/// host's `Resume`, then applies it. Returns the exec port, ready for the run request.
pub fn park_and_resume(exec: &PathBuf) -> anyhow::Result<File> {
    let stream = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(exec)
        .with_context(|| format!("opening {}", exec.display()))?;
    let channel = command::Channel::new(&stream).context("exec port")?;
    channel
        .send(&GuestMsg::Parked)
        .context("saying parked on the exec port")?;
    let mut buf = Vec::new();
    let msg = hexz_protocol::frame::read_frame(
        &mut WaitForHost(&stream),
        hexz_protocol::exec::MAX_EXEC_FRAME,
        &mut buf,
    )
    .and_then(|()| hexz_protocol::frame::decode_body::<HostMsg>(&buf))
    .context("waiting for the host to resume this template")?;
    let HostMsg::Resume {
        entropy,
        unix_nanos,
    } = msg
    else {
        bail!("expected a resume message first, got {msg:?}");
    };
    reseed_random(&entropy)?;
    set_clock(unix_nanos)?;
    eprintln!(
        "hexz-init: restored: random generator reseeded with {} host bytes, clock set",
        entropy.len()
    );
    Ok(stream)
}

/// Mixes the host's bytes into the kernel's pool, credited as entropy, and forces the
/// kernel's generator to reseed now: every clone of a template starts with the same
/// pool, so without this they would produce the same "random" bytes.
fn reseed_random(entropy: &[u8]) -> anyhow::Result<()> {
    if entropy.len() < 32 {
        bail!("the host sent only {} bytes of entropy", entropy.len());
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    let bits = i32::try_from(entropy.len() * 8).context("entropy size")?;
    let len = i32::try_from(entropy.len()).context("entropy size")?;
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    info.resize(8 + entropy.len().div_ceil(4) * 4, 0);
    let random = File::open("/dev/urandom").context("opening /dev/urandom")?;
    const RNDADDENTROPY: libc::Ioctl = 0x4008_5203 as libc::Ioctl;
    const RNDRESEEDCRNG: libc::Ioctl = 0x5207 as libc::Ioctl;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of the size its header states, which
    // `info` holds (padded to whole u32 words); RNDRESEEDCRNG takes no argument.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error()).context("RNDADDENTROPY");
        }
        if libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) != 0 {
            return Err(std::io::Error::last_os_error()).context("RNDRESEEDCRNG");
        }
    }
    Ok(())
}

/// Sets the wall clock: a restored guest's clock says when the template was saved.
fn set_clock(unix_nanos: u64) -> anyhow::Result<()> {
    let ts = libc::timespec {
        tv_sec: i64::try_from(unix_nanos / 1_000_000_000).context("clock")?,
        tv_nsec: i64::try_from(unix_nanos % 1_000_000_000).context("clock")?,
    };
    // SAFETY: clock_settime reads the timespec we pass.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting the clock");
    }
    Ok(())
}
