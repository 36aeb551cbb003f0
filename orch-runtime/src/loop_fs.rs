//! Loop-mounted ext4 file systems, one per volume, for [`LocalVolumes`](crate::LocalVolumes)
//! when it enforces sizes: a sparse image file formatted with `mkfs.ext4` and mounted with
//! `mount -o loop`, unmounted with `umount`.
//!
//! The tools run as subprocesses (blocking; callers run these functions on a blocking thread).
//! `mount -o loop` finds a free loop device itself and sets it to detach when the file system is
//! unmounted (autoclear), so an `umount` never leaves a loop device behind and no loop ioctl is
//! made here.
//!
//! Sizing: a volume of capacity `C` gets an image sized so that, right after formatting, the
//! mounted file system offers (`statvfs` `f_bavail`) between `C + slack(C)` and
//! `C + slack(C) + tolerance(C)` bytes, where `slack(C) = 64 KiB + C / 1024` (room for the
//! metadata of the files written, so that `C` bytes of file data fit) and
//! `tolerance(C) = 64 KiB + C / 256`. The image starts at `C + C / 8 + 1 MiB` and is
//! formatted again with its size corrected by what the file system offered, at most
//! [`ATTEMPTS`] times. It is formatted with `-m 0` (no blocks reserved for root) and without
//! the room to grow (`^resize_inode`); the image is fresh (all zeros), so the inode tables and
//! the journal are not written out (`lazy_itable_init`, `lazy_journal_init`).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// How many times an image is formatted to reach its size window.
pub(crate) const ATTEMPTS: usize = 6;
/// The mount options of every volume: no device files, no set-user-id programs.
const MOUNT_OPTIONS: &str = "loop,nosuid,nodev";

/// Runs `program args`, failing with what it printed when it does not exit 0, or naming the
/// program when it cannot be run (not installed, not on `PATH`).
fn run(program: &OsStr, args: &[&OsStr]) -> io::Result<()> {
    let shown = || {
        let mut s = program.to_string_lossy().into_owned();
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    };
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", program.to_string_lossy())))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(io::Error::other(format!("`{}` failed ({}): {}", shown(), out.status, stderr.trim())));
    }
    Ok(())
}

/// Whether `dir` is a mount point: it is on another device than its parent. A missing `dir`
/// (or one under a file) is not.
pub(crate) fn is_mountpoint(dir: &Path) -> io::Result<bool> {
    let here = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let parent = std::fs::metadata(dir.join(".."))?;
    Ok(here.dev() != parent.dev())
}

/// Mounts the file system in `image` on `dir` through a loop device.
pub(crate) fn mount(image: &Path, dir: &Path) -> io::Result<()> {
    run("mount".as_ref(), &["-o".as_ref(), MOUNT_OPTIONS.as_ref(), image.as_os_str(), dir.as_os_str()])
}

/// Unmounts whatever is mounted on `dir` (every layer), if anything; the loop device under it
/// detaches with it. A busy file system fails, left mounted.
pub(crate) fn unmount(dir: &Path) -> io::Result<()> {
    for _ in 0..8 {
        if !is_mountpoint(dir)? {
            return Ok(());
        }
        run("umount".as_ref(), &[dir.as_os_str()])?;
    }
    Err(io::Error::other(format!("{} is still mounted after 8 unmounts", dir.display())))
}

/// Unmounts `<dir>/data` if it is mounted, then removes `dir` and all in it. Never removes
/// through a mount point: a file system that will not unmount fails the removal.
pub(crate) fn remove_volume_dir(dir: &Path) -> io::Result<()> {
    unmount(&dir.join("data"))?;
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Bytes a mounted file system offers to unprivileged writers (`statvfs` `f_bavail`).
fn available(dir: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    let bytes = u128::from(st.blocks_available()) * u128::from(st.fragment_size());
    Ok(u64::try_from(bytes).unwrap_or(u64::MAX))
}

/// A fresh sparse `image` of `size` bytes, formatted ext4.
fn format(mkfs: &Path, image: &Path, size: u64) -> io::Result<()> {
    // Created anew (truncated) so that it reads as zeros, as the lazy init options require.
    std::fs::File::create(image)?.set_len(size)?;
    let args: [&OsStr; 9] = [
        "-q".as_ref(),
        "-F".as_ref(),
        "-m".as_ref(),
        "0".as_ref(),
        "-O".as_ref(),
        "^resize_inode".as_ref(),
        "-E".as_ref(),
        "nodiscard,lazy_itable_init=1,lazy_journal_init=1".as_ref(),
        image.as_os_str(),
    ];
    run(mkfs.as_os_str(), &args)
}

/// The window of bytes the file system of a volume of `capacity` bytes offers: see the module
/// documentation.
pub(crate) fn window(capacity: u64) -> (u64, u64) {
    let low = capacity + 64 * KIB + capacity / 1024;
    (low, low + 64 * KIB + capacity / 256)
}

/// Makes the file system of a volume of `capacity` bytes in `image` and leaves it mounted on
/// `data` (an empty directory), sized as the module documentation says; answers the image's
/// size. On failure nothing is left mounted on `data`.
pub(crate) fn make(mkfs: &Path, image: &Path, data: &Path, capacity: u64) -> io::Result<u64> {
    let (low, high) = window(capacity);
    let aim = low + (high - low) / 2;
    let mut size = capacity + capacity / 8 + MIB;
    let mut offered = 0;
    for attempt in 1..=ATTEMPTS {
        format(mkfs, image, size)?;
        mount(image, data)?;
        offered = match available(data) {
            Ok(b) => b,
            Err(e) => {
                let _ = unmount(data);
                return Err(e);
            }
        };
        if (low..=high).contains(&offered) || (attempt == ATTEMPTS && offered >= low) {
            // A new volume is empty: the file system's `lost+found` goes (`e2fsck` makes it
            // again should it need it).
            if let Err(e) = std::fs::remove_dir(data.join("lost+found")) {
                let _ = unmount(data);
                return Err(e);
            }
            return Ok(size);
        }
        unmount(data)?;
        // The overhead of the file system changes little with its size: correct by the miss,
        // rounded to whole 4 KiB blocks.
        let corrected = (size as i128 + aim as i128 - offered as i128).max(MIB as i128) as u64;
        size = corrected.div_ceil(4 * KIB) * 4 * KIB;
    }
    Err(io::Error::other(format!(
        "no image size found whose file system offers {low} to {high} bytes (the last offered {offered})"
    )))
}

/// Whether loop-mounted ext4 file systems work under `root`: makes, formats, mounts and
/// unmounts a tiny one in `probe_dir` (under `root`), then removes it. Fails saying what did
/// not work.
pub(crate) fn probe(mkfs: &Path, probe_dir: &Path) -> io::Result<()> {
    let data = probe_dir.join("data");
    let result = (|| {
        std::fs::create_dir_all(&data)?;
        let image = probe_dir.join("image");
        format(mkfs, &image, 2 * MIB)?;
        mount(&image, &data)?;
        if !is_mountpoint(&data)? {
            return Err(io::Error::other(format!("{} is not a mount point after mount", data.display())));
        }
        unmount(&data)
    })();
    let cleaned = remove_volume_dir(probe_dir);
    result.and(cleaned)
}
