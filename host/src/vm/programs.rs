//! Host programs added to the guest image on request (`--with git`): each goes in at its
//! host path, with the shared libraries and the loader `ldd` names at theirs, so the
//! program finds them as it does on the host.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Paths in the image that an added program must never replace.
const RESERVED: &[&str] = &["/init", "/bin/sh", "/bin/busybox", "/bin/hexz-guestfused"];

/// A program and the files it needs, as absolute host paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub path: PathBuf,
    /// Shared libraries and the dynamic loader (empty for a static program).
    pub libraries: Vec<PathBuf>,
}

impl Program {
    /// `name` on `PATH`, or the file `name` names when it has a `/`.
    pub fn find(name: &str) -> Result<Program> {
        let path = if name.contains('/') {
            PathBuf::from(name)
        } else {
            super::find_in_path(name)
                .ok_or_else(|| Error::Invalid(format!("--with {name}: no such program on PATH")))?
        };
        let path = std::path::absolute(&path).map_err(|e| Error::io(&path, e))?;
        if !path.is_file() {
            return Err(Error::Invalid(format!(
                "--with {name}: {} is not a file",
                path.display()
            )));
        }
        if RESERVED.iter().any(|r| Path::new(r) == path) {
            return Err(Error::Invalid(format!(
                "--with {name}: {} would replace a file the guest needs",
                path.display()
            )));
        }
        let libraries = shared_libraries(&path)?;
        Ok(Program { path, libraries })
    }

    /// Every file to copy: the program, then its libraries.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.path).chain(self.libraries.iter())
    }
}

/// What `ldd` says `bin` loads (none for a static binary).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| Error::Invalid(format!("cannot run ldd (install libc-bin): {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic") {
            return Ok(Vec::new());
        }
        return Err(Error::Invalid(format!(
            "ldd {}: {}",
            bin.display(),
            stderr.trim()
        )));
    }
    parse_ldd(&stdout).map_err(|line| {
        Error::Invalid(format!(
            "ldd {}: cannot use `{line}` (a library is missing on this host?)",
            bin.display()
        ))
    })
}

/// The absolute paths in `ldd` output; `Err(line)` for a library it could not find.
fn parse_ldd(text: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") || line.starts_with("linux-vdso") {
            continue;
        }
        let target = match line.split_once(" => ") {
            Some((_, rest)) => rest,
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or("");
        if !path.starts_with('/') {
            return Err(line.to_string());
        }
        libs.push(PathBuf::from(path));
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader_and_names_a_missing_one() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f1)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).expect("parse"),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n"),
            Err("libfoo.so.1 => not found".to_string())
        );
    }

    #[test]
    fn a_program_cannot_replace_the_guest_shell() {
        assert!(Program::find("/bin/sh").is_err());
    }
}
