//! Advisory claims between a backup reading its source and a restore writing its target, so
//! that a restore never overwrites the disk a running backup is reading (and a backup never
//! reads a disk that a restore is writing). A backup holds a shared `flock` on its source for
//! its whole run; a restore takes an exclusive one on its target before writing a byte. Both are
//! taken without waiting: the one that comes second is refused with one line.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Result};

fn try_flock(file: &File, operation: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own; LOCK_NB makes it return at once.
    match unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) } {
        0 => Ok(true),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
            e => Err(e),
        },
    }
}

/// Called by a backup on its opened source; the claim lasts as long as `file` is open.
pub fn claim_source(file: &File, path: &Path) -> Result<()> {
    match try_flock(file, libc::LOCK_SH) {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            "{}: a `strata restore` is writing onto this source; wait for it to finish and back up then",
            path.display()
        ),
        Err(e) => {
            log::debug!("{}: cannot claim the source ({e}); going on without the claim", path.display());
            Ok(())
        }
    }
}

/// Called by a restore on its opened target, before it changes anything; the claim lasts as
/// long as `file` is open.
pub fn claim_target(file: &File, path: &Path) -> Result<()> {
    match try_flock(file, libc::LOCK_EX) {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            "{}: the source of a running `strata backup` (or another restore's target); refusing to \
             overwrite it; wait for that to finish, or choose another target",
            path.display()
        ),
        Err(e) => {
            log::debug!("{}: cannot claim the target ({e}); going on without the claim", path.display());
            Ok(())
        }
    }
}
