//! `verify DIR`: every backup of a set checked against its manifest, the
//! parents included (each once), plus the damage the catalog found in the
//! chains; each result is recorded for `list` ([`catalog::record_verify`]).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use qbackup_formats::open::Opener;

use crate::verify::{self, Report, VerifyError};

use super::catalog::{self, Catalog, VerifyRecord};
use super::SetError;

/// One backup's verdict.
#[derive(Debug)]
pub struct Checked {
    /// Its index in the catalog.
    pub index: usize,
    /// The damage the catalog found in its chain (missing, swapped or
    /// unreadable parents, its own unreadable manifest).
    pub chain_problems: Vec<String>,
    /// What `verify` found, or why it could not check.
    pub report: Option<Result<Report, VerifyError>>,
}

impl Checked {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.chain_problems.is_empty() && matches!(&self.report, Some(Ok(r)) if r.ok())
    }

    /// True when it was found damaged (not just uncheckable).
    pub fn damaged(&self) -> bool {
        !self.chain_problems.is_empty() || matches!(&self.report, Some(Ok(r)) if !r.ok())
    }
}

/// Verifies every backup of the set; `each` sees each verdict as it comes.
/// Results are recorded in the set.
pub fn verify_set(
    set: &Path,
    opener: &dyn Opener,
    each: &mut dyn FnMut(&Catalog, &Checked),
) -> Result<(Catalog, Vec<Checked>), SetError> {
    let cat = catalog::read(set)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut all = Vec::new();
    let mut records = Vec::new();
    for (index, b) in cat.backups.iter().enumerate() {
        let report = b.meta.is_some().then(|| verify::verify(opener, &b.path));
        let c = Checked {
            index,
            chain_problems: b.problems.clone(),
            report,
        };
        if b.meta.is_some() && (c.ok() || c.damaged()) {
            let result = if c.ok() { "ok" } else { "damaged" };
            records.push((
                b.id.clone(),
                VerifyRecord {
                    result: result.into(),
                    time: now,
                },
            ));
        }
        each(&cat, &c);
        all.push(c);
    }
    catalog::record_verify(set, &records)?;
    Ok((cat, all))
}
