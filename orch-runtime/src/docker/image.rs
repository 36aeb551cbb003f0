//! Local images without a registry: `docker import` of a root filesystem, and the smallest
//! useful one, a statically linked busybox with its applets (what the tests and benches run).

use std::path::Path;

use bollard::query_parameters::{CreateImageOptionsBuilder, RemoveImageOptionsBuilder};
use futures::StreamExt;
use orch_core::runtime::RuntimeError;

use super::{DockerError, DockerRuntime, error};

/// A root filesystem holding `busybox` (which must be statically linked: the image has no C
/// library) as `/bin/busybox`, a link per applet in `/bin` (`sh`, `sleep`, `echo`…), and
/// empty `/tmp`, `/etc`, `/root` directories, as a tar archive for [`DockerRuntime::import_image`].
/// On Debian, `apt-get install busybox-static` provides one at `/bin/busybox`.
pub fn busybox_rootfs(busybox: &Path) -> Result<Vec<u8>, RuntimeError> {
    let io = |what: &str, e: std::io::Error| RuntimeError::io(format!("{what} {}", busybox.display()), e);
    let binary = std::fs::read(busybox).map_err(|e| io("reading", e))?;
    if !is_static_elf(&binary) {
        return Err(RuntimeError::invalid(
            "busybox",
            format!("{} is not a statically linked ELF executable (install busybox-static)", busybox.display()),
        ));
    }
    let listed = std::process::Command::new(busybox).arg("--list").output().map_err(|e| io("running", e))?;
    let applets = String::from_utf8_lossy(&listed.stdout).into_owned();
    let mut tar = tar::Builder::new(Vec::new());
    let io = |e: std::io::Error| RuntimeError::io("building a root filesystem archive", e);
    for (dir, mode) in [("bin/", 0o755), ("etc/", 0o755), ("root/", 0o700), ("tmp/", 0o1777)] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        tar.append_data(&mut h, dir, std::io::empty()).map_err(io)?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_size(binary.len() as u64);
    tar.append_data(&mut h, "bin/busybox", binary.as_slice()).map_err(io)?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/')) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox").map_err(io)?;
    }
    tar.into_inner().map_err(io)
}

/// True for a 64-bit little-endian ELF file without an interpreter (`PT_INTERP`), i.e. one
/// that needs no dynamic loader.
fn is_static_elf(bytes: &[u8]) -> bool {
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at =
        |at: usize| bytes.get(at..at + 8).and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok());
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(offset), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else { return false };
    (0..count).all(|i| u32_at(offset + i * size).is_some_and(|kind| kind != 3))
}

impl DockerRuntime {
    /// Makes image `name` (`repo:tag`) from a root filesystem archive, as `docker import` does:
    /// how to get an image onto a node that reaches no registry. Replaces an image of that name.
    pub async fn import_image(&self, name: &str, rootfs_tar: Vec<u8>) -> Result<(), RuntimeError> {
        let (repo, tag) = match name.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((repo, tag)) => (repo, tag),
            None => (name, "latest"),
        };
        let options = CreateImageOptionsBuilder::default().from_src("-").repo(repo).tag(tag).build();
        let docker = self.docker().await?;
        let mut progress = docker.create_image(Some(options), Some(bollard::body_full(rootfs_tar.into())), None);
        while let Some(step) = progress.next().await {
            step.map_err(|e| self.api_error(format!("import image {name}"), e))?;
        }
        Ok(())
    }

    /// Removes image `name`; an image that is not there is fine. Containers still using it
    /// keep it alive (the Engine refuses), unless `force`.
    pub async fn remove_image(&self, name: &str, force: bool) -> Result<(), RuntimeError> {
        let options = RemoveImageOptionsBuilder::default().force(force).build();
        match self.docker().await?.remove_image(name, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404) => Ok(()),
            Err(e) => Err(DockerError::classify(&self.inner.address, format!("remove image {name}"), e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_static_executables_are_taken() {
        let own = std::fs::read("/proc/self/exe").unwrap();
        // Test binaries are linked against the C library.
        assert!(!is_static_elf(&own));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let e = busybox_rootfs(Path::new("/proc/self/exe")).unwrap_err();
        assert!(e.to_string().contains("busybox-static"), "{e}");
    }
}
