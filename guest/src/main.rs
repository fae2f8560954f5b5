//! `hexz-guestfused`: the guest FUSE daemon. Not built yet: this binary only parses its
//! command line and says so, so that nobody mistakes it for a working daemon.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "hexz-guestfused",
    version,
    about = "hexz guest FUSE daemon (not implemented yet)"
)]
struct Cli {
    /// Where to mount the workspace.
    mountpoint: std::path::PathBuf,
    /// Server address: vsock:<CID>:<PORT>, unix:<PATH> or tcp:<HOST>:<PORT>.
    #[arg(long, default_value = "vsock:2:5001")]
    connect: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "hexz-guestfused: cannot mount {} from {}: the guest daemon is not implemented in this build (protocol v{} only)",
        cli.mountpoint.display(),
        cli.connect,
        hexz_protocol::VERSION
    );
    ExitCode::from(2)
}
