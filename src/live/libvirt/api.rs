//! The libvirt calls the `virt` crate (0.5) does not wrap: pull-mode
//! backups (`virDomainBackupBegin`, `virDomainBackupGetXMLDesc`), ending
//! the domain's job, and checkpoints. Each is a thin safe function over
//! `virt::sys`; every pointer libvirt hands back is freed here.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;

use virt::domain::Domain;
use virt::enumutil::{Enum, RawEnum};
use virt::error::Error;
use virt::sys;

/// libvirt's error code of `e`.
pub fn code(e: &Error) -> sys::virErrorNumber {
    match e.code() {
        Enum::Known(k) => k.to_raw(),
        Enum::Unknown(u) => u,
    }
}

fn cstring(s: &str) -> CString {
    // Names and XML qbackup builds never hold NUL; one that does is cut
    // there, and libvirt then refuses what is left.
    CString::new(s.split('\0').next().unwrap_or_default()).expect("no NUL left")
}

/// Takes ownership of a string libvirt allocated.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string from libvirt's allocator.
unsafe fn take_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    libc::free(p.cast());
    Some(s)
}

/// Starts a backup job described by `backup_xml`, creating the checkpoint
/// `checkpoint_xml`, if any, in the same step (libvirt does both or
/// neither).
pub fn backup_begin(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
) -> Result<(), Error> {
    let b = cstring(backup_xml);
    let c = checkpoint_xml.map(cstring);
    let c_ptr = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: the domain pointer is valid while `dom` lives; the strings
    // are NUL-terminated and outlive the call (NULL: no checkpoint).
    let r = unsafe { sys::virDomainBackupBegin(dom.as_ptr(), b.as_ptr(), c_ptr, 0) };
    if r < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// The XML of the domain's running backup job, or `None` when it has none.
pub fn backup_xml(dom: &Domain) -> Result<Option<String>, Error> {
    // SAFETY: valid domain pointer; the result is freed by take_string.
    let p = unsafe { sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0) };
    if p.is_null() {
        let e = Error::last_error();
        if code(&e) == sys::VIR_ERR_NO_DOMAIN_BACKUP {
            return Ok(None);
        }
        return Err(e);
    }
    // SAFETY: non-NULL string from libvirt.
    Ok(unsafe { take_string(p) })
}

/// Ends the domain's job (for a pull-mode backup: stops the export and
/// removes the scratch files; the checkpoint made with it stays).
pub fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: valid domain pointer.
    let r = unsafe { sys::virDomainAbortJob(dom.as_ptr()) };
    if r < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// The names of the domain's checkpoints, parents before children.
pub fn checkpoints(dom: &Domain) -> Result<Vec<String>, Error> {
    let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: valid domain pointer; libvirt fills `list` with `n` owned
    // checkpoint pointers, each freed below, then the array itself.
    let n = unsafe {
        sys::virDomainListAllCheckpoints(
            dom.as_ptr(),
            &mut list,
            sys::VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL,
        )
    };
    if n < 0 {
        return Err(Error::last_error());
    }
    let mut names = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: i < n entries, each a valid checkpoint pointer.
        unsafe {
            let cp = *list.add(i);
            let name = sys::virDomainCheckpointGetName(cp);
            if !name.is_null() {
                names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
            sys::virDomainCheckpointFree(cp);
        }
    }
    if !list.is_null() {
        // SAFETY: the array libvirt allocated.
        unsafe { libc::free(list.cast()) };
    }
    Ok(names)
}

/// Looks up a checkpoint; `None` when the domain has none of that name.
fn lookup(dom: &Domain, name: &str) -> Result<Option<sys::virDomainCheckpointPtr>, Error> {
    let n = cstring(name);
    // SAFETY: valid domain pointer and string.
    let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), n.as_ptr(), 0) };
    if cp.is_null() {
        let e = Error::last_error();
        if code(&e) == sys::VIR_ERR_NO_DOMAIN_CHECKPOINT {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(cp))
}

/// The XML of the checkpoint `name`, or `None` when there is none.
pub fn checkpoint_xml(dom: &Domain, name: &str) -> Result<Option<String>, Error> {
    let Some(cp) = lookup(dom, name)? else {
        return Ok(None);
    };
    // SAFETY: `cp` is a valid checkpoint pointer, freed after use.
    let (xml, err) = unsafe {
        let p = sys::virDomainCheckpointGetXMLDesc(cp, 0);
        let err = p.is_null().then(Error::last_error);
        let xml = take_string(p);
        sys::virDomainCheckpointFree(cp);
        (xml, err)
    };
    match err {
        Some(e) => Err(e),
        None => Ok(xml),
    }
}

/// Deletes the checkpoint `name` (libvirt merges its bitmap into its
/// parent's, so the parent still covers every write since itself).
/// Returns false when there was none.
pub fn delete_checkpoint(dom: &Domain, name: &str) -> Result<bool, Error> {
    delete_checkpoint_with(dom, name, 0)
}

/// Forgets the checkpoint `name` without touching its bitmaps (for a
/// checkpoint whose bitmaps a crash broke, which libvirt cannot merge).
pub fn forget_checkpoint(dom: &Domain, name: &str) -> Result<bool, Error> {
    delete_checkpoint_with(dom, name, sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
}

fn delete_checkpoint_with(dom: &Domain, name: &str, flags: u32) -> Result<bool, Error> {
    let Some(cp) = lookup(dom, name)? else {
        return Ok(false);
    };
    // SAFETY: valid checkpoint pointer, freed after use.
    let r = unsafe {
        let r = sys::virDomainCheckpointDelete(cp, flags);
        let err = (r < 0).then(Error::last_error);
        sys::virDomainCheckpointFree(cp);
        err
    };
    match r {
        Some(e) => Err(e),
        None => Ok(true),
    }
}
