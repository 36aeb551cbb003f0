//! The file's layout: its tables, the format version and the upgrade from format 2, and how the
//! changes of one commit are encoded as one log record.

use orch_core::DynamicObject;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::memory::index::Change;

/// Store-wide counters: `format`, `revision`, `floor` (oldest revision of the history),
/// `checkpoint` (the objects table holds every change before it) and `next_lease`.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("orch.meta");
/// (kind, namespace, name) → (its resource version, the object as JSON): every object as of the
/// checkpoint, that is with every change before the `checkpoint` revision applied. Later changes
/// are in the log; the objects table catches up when the log is trimmed.
pub(super) const OBJECTS: TableDefinition<(&str, &str, &str), (u64, &[u8])> = TableDefinition::new("orch.objects");
/// First revision of a commit → every change of that commit, in order, as one record (see
/// [`encode_changes`]): a commit costs one insert, however many writes it carries.
pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("orch.commits");
/// Lease id → its time to live in nanoseconds.
pub(super) const LEASES: TableDefinition<u64, u64> = TableDefinition::new("orch.leases");

/// Version of the layout above, checked on open.
pub(super) const FORMAT: u64 = 3;
/// The first bytes of every redb file (redb's file header), checked before redb sees the file so
/// a foreign file is refused without being touched.
pub(super) const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Format {
    /// A new, empty database: ours to initialize.
    Empty,
    /// An orch store of the current format.
    Orch,
    /// An orch store of format 2 (objects and a log entry per change), upgraded on a writable
    /// open.
    Orch2,
}

/// Tells an orch store from an empty database and from anything else, without writing.
pub(super) fn check_format(db: &impl ReadableDatabase) -> std::result::Result<Format, String> {
    let txn = db.begin_read().map_err(|e| format!("redb cannot read it: {e}"))?;
    match txn.open_table(META) {
        Ok(meta) => match meta.get("format").map_err(|e| format!("redb cannot read it: {e}"))? {
            Some(v) if v.value() == FORMAT => Ok(Format::Orch),
            Some(v) if v.value() == 2 => Ok(Format::Orch2),
            Some(v) => Err(format!("it has orch store format {}, this version reads format {FORMAT}", v.value())),
            None => Err("it is not an orch store (no format marker)".into()),
        },
        Err(TableError::TableDoesNotExist(_)) => {
            let tables = txn.list_tables().map_err(|e| format!("redb cannot read it: {e}"))?.count();
            let multimaps = txn.list_multimap_tables().map_err(|e| format!("redb cannot read it: {e}"))?.count();
            if tables + multimaps == 0 {
                Ok(Format::Empty)
            } else {
                Err("it is a redb database of another program (no orch.meta table)".into())
            }
        }
        Err(e) => Err(format!("it is not an orch store ({e})")),
    }
}

pub(super) fn init(db: &redb::Database) -> std::result::Result<(), BoxError> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert("format", FORMAT)?;
        meta.insert("revision", 0)?;
        meta.insert("floor", 1)?;
        meta.insert("checkpoint", 1)?;
        meta.insert("next_lease", 1)?;
        txn.open_table(OBJECTS)?;
        txn.open_table(LOG)?;
        txn.open_table(LEASES)?;
    }
    txn.commit()?;
    Ok(())
}

/// Upgrades a format-2 store in place, in one transaction: its objects table (which held every
/// object at the current revision, as this format's checkpoint does) is kept, and its per-change
/// log is dropped, so the revisions before the upgrade answer `Compacted` from then on.
pub(super) fn upgrade_from_2(db: &redb::Database) -> std::result::Result<(), BoxError> {
    /// Format 2's log: (revision, index) → (deleted, previous version, state, previous state).
    type OldEntry = (bool, u64, &'static [u8], &'static [u8]);
    const OLD_LOG: TableDefinition<(u64, u32), OldEntry> = TableDefinition::new("orch.log");
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let revision = meta.get("revision")?.map(|v| v.value()).ok_or("its orch.meta table has no revision")?;
        meta.insert("format", FORMAT)?;
        meta.insert("checkpoint", revision + 1)?;
        meta.insert("floor", revision + 1)?;
        txn.open_table(LOG)?;
    }
    txn.delete_table(OLD_LOG)?;
    txn.commit()?;
    tracing::info!("upgraded an orch store from format 2 to format {FORMAT}; its history before the upgrade is gone");
    Ok(())
}

/// What the writer remembers of one commit record in the log.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    /// Its first and last revision.
    pub(super) first: u64,
    pub(super) last: u64,
    /// How many changes it holds.
    pub(super) changes: usize,
}

/// One change as stored in a commit record.
#[derive(Debug, PartialEq)]
pub(super) struct Record<'a> {
    pub(super) revision: u64,
    pub(super) deleted: bool,
    pub(super) prev_rv: u64,
    pub(super) kind: &'a str,
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    /// The new state as JSON (for a delete, the final state stamped with the deletion revision).
    pub(super) json: &'a [u8],
}

/// Encodes the changes of one commit as one record: for each change its revision (u64), deleted
/// (u8), the resource version it replaced (u64), then kind, namespace, name and the state as
/// JSON, each with its length (u32) first; integers little-endian.
pub(super) fn encode_changes(changes: &[Change]) -> std::result::Result<Vec<u8>, BoxError> {
    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(changes.len() * 1280);
    for c in changes {
        let o = &c.object;
        out.extend_from_slice(&c.revision.to_le_bytes());
        out.push(u8::from(c.deleted));
        out.extend_from_slice(&c.prev.as_ref().map_or(0, |p| p.metadata.resource_version).to_le_bytes());
        put(&mut out, o.kind.as_bytes());
        put(&mut out, o.metadata.namespace.as_bytes());
        put(&mut out, o.metadata.name.as_bytes());
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut out, &**o)?;
        let len = u32::try_from(out.len() - at - 4).map_err(|_| format!("{} is too large to store", o.key()))?;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    Ok(out)
}

/// Decodes a record written by [`encode_changes`]; anything short, too long or not UTF-8 where
/// text belongs is an error saying what.
pub(super) fn decode_changes(mut bytes: &[u8]) -> std::result::Result<Vec<Record<'_>>, String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err(format!("it ends inside a change's {what}"));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    fn u64_of(bytes: &mut &[u8], what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(take(bytes, 8, what)?.try_into().map_err(|_| what.to_string())?))
    }
    fn sized<'a>(bytes: &mut &'a [u8], what: &str) -> std::result::Result<&'a [u8], String> {
        let len = u32::from_le_bytes(take(bytes, 4, what)?.try_into().map_err(|_| what.to_string())?);
        take(bytes, len as usize, what)
    }
    fn text<'a>(bytes: &mut &'a [u8], what: &str) -> std::result::Result<&'a str, String> {
        std::str::from_utf8(sized(bytes, what)?).map_err(|_| format!("a change's {what} is not UTF-8"))
    }
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let revision = u64_of(&mut bytes, "revision")?;
        let deleted = match take(&mut bytes, 1, "deleted flag")?[0] {
            0 => false,
            1 => true,
            other => return Err(format!("a change's deleted flag is {other}")),
        };
        let prev_rv = u64_of(&mut bytes, "previous version")?;
        let (kind, namespace, name) =
            (text(&mut bytes, "kind")?, text(&mut bytes, "namespace")?, text(&mut bytes, "name")?);
        let json = sized(&mut bytes, "state")?;
        records.push(Record { revision, deleted, prev_rv, kind, namespace, name, json });
    }
    Ok(records)
}

pub(super) fn decode_object(bytes: &[u8]) -> serde_json::Result<DynamicObject> {
    serde_json::from_slice(bytes)
}
