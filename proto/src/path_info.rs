//! Path metadata ("ValidPathInfo") and how each protocol encodes it.

use std::collections::BTreeSet;

use bytes::BufMut;

use crate::hash::{Hash, HashAlgo};
use crate::store_path::{
    StoreDir, StorePath, make_source_path, put_opt_store_path, put_store_path, put_store_path_set,
    read_opt_store_path, read_store_path, read_store_path_set,
};
use crate::version::ProtocolVersion;
use crate::wire::{ReadError, ReadResult, WireReader, WireWrite};

/// Everything a store knows about a valid path. One type for both protocols: the serve
/// protocol lacks `registration_time` and `ultimate`, which then read as 0 and false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path itself.
    pub path: StorePath,
    /// The derivation that produced it, if known.
    pub deriver: Option<StorePath>,
    /// SHA-256 of the NAR serialisation.
    pub nar_hash: Hash,
    /// Paths this one refers to (may include itself).
    pub references: BTreeSet<StorePath>,
    /// Unix seconds; 0 when unknown.
    pub registration_time: i64,
    /// Size of the NAR serialisation in bytes.
    pub nar_size: u64,
    /// Whether the store built it itself (trusted without signatures).
    pub ultimate: bool,
    /// `keyname:base64sig` entries.
    pub sigs: BTreeSet<String>,
    /// Content address (`fixed:r:sha256:...`, `text:sha256:...`), passed through unchanged.
    pub ca: Option<String>,
}

/// The worker protocol's first path-info version with `ultimate`, `sigs` and `ca`.
const WORKER_INFO_SIGS: ProtocolVersion = ProtocolVersion::new(1, 16);

pub(crate) fn read_nar_hash(r: &mut WireReader<'_>, field: &'static str) -> ReadResult<Hash> {
    let s = r.read_string(field)?;
    Hash::parse_field(&s, Some(HashAlgo::Sha256), field).map_err(ReadError::Proto)
}

pub(crate) fn read_ca(r: &mut WireReader<'_>, field: &'static str) -> ReadResult<Option<String>> {
    let s = r.read_string(field)?;
    Ok((!s.is_empty()).then_some(s))
}

pub(crate) fn read_sigs(
    r: &mut WireReader<'_>,
    field: &'static str,
) -> ReadResult<BTreeSet<String>> {
    Ok(r.read_string_list(field)?.into_iter().collect())
}

impl PathInfo {
    /// Decodes the worker protocol's "UnkeyedValidPathInfo" (the `QueryPathInfo` reply), for
    /// `path`, at negotiated version `v`.
    pub fn read_worker_unkeyed(
        r: &mut WireReader<'_>,
        dir: &StoreDir,
        v: ProtocolVersion,
        path: StorePath,
    ) -> ReadResult<Self> {
        let deriver = read_opt_store_path(r, dir, "PathInfo.deriver")?;
        let nar_hash = read_nar_hash(r, "PathInfo.narHash")?;
        let references = read_store_path_set(r, dir, "PathInfo.references")?;
        let registration_time = r.read_time("PathInfo.registrationTime")?;
        let nar_size = r.read_u64()?;
        let (ultimate, sigs, ca) = if v >= WORKER_INFO_SIGS {
            (
                r.read_bool()?,
                read_sigs(r, "PathInfo.sigs")?,
                read_ca(r, "PathInfo.ca")?,
            )
        } else {
            (false, BTreeSet::new(), None)
        };
        Ok(PathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca,
        })
    }

    /// Decodes the keyed worker form (path first), as in `AddMultipleToStore` streams.
    pub fn read_worker_keyed(
        r: &mut WireReader<'_>,
        dir: &StoreDir,
        v: ProtocolVersion,
    ) -> ReadResult<Self> {
        let path = read_store_path(r, dir, "PathInfo.path")?;
        Self::read_worker_unkeyed(r, dir, v, path)
    }

    /// Encodes the unkeyed worker form. The hash goes out as bare base16, which every Nix
    /// version accepts.
    pub fn put_worker_unkeyed<B: BufMut + ?Sized>(
        &self,
        out: &mut B,
        dir: &StoreDir,
        v: ProtocolVersion,
    ) {
        put_opt_store_path(out, dir, self.deriver.as_ref());
        out.put_str(&self.nar_hash.to_base16());
        put_store_path_set(out, dir, &self.references);
        out.put_time(self.registration_time);
        out.put_word(self.nar_size);
        if v >= WORKER_INFO_SIGS {
            out.put_flag(self.ultimate);
            out.put_str_list(&self.sigs);
            out.put_str(self.ca.as_deref().unwrap_or(""));
        }
    }

    /// Encodes the keyed worker form.
    pub fn put_worker_keyed<B: BufMut + ?Sized>(
        &self,
        out: &mut B,
        dir: &StoreDir,
        v: ProtocolVersion,
    ) {
        put_store_path(out, dir, &self.path);
        self.put_worker_unkeyed(out, dir, v);
    }

    /// Decodes one serve `QueryPathInfos` record after its path (serve >= 2.4 only: this crate
    /// refuses older serve peers, so the hash is always present). The serve protocol also sends
    /// a `downloadSize`, which Nix fills with narSize; it is read and dropped.
    pub fn read_serve_record(
        r: &mut WireReader<'_>,
        dir: &StoreDir,
        path: StorePath,
    ) -> ReadResult<Self> {
        let deriver = read_opt_store_path(r, dir, "QueryPathInfos.deriver")?;
        let references = read_store_path_set(r, dir, "QueryPathInfos.references")?;
        let _download_size = r.read_u64()?;
        let nar_size = r.read_u64()?;
        let nar_hash = read_nar_hash(r, "QueryPathInfos.narHash")?;
        let ca = read_ca(r, "QueryPathInfos.ca")?;
        let sigs = read_sigs(r, "QueryPathInfos.sigs")?;
        Ok(PathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs,
            ca,
        })
    }

    /// Encodes one serve `QueryPathInfos` record including its path, as Nix servers do
    /// (`sha256:<nix32>` hash).
    pub fn put_serve_record<B: BufMut + ?Sized>(&self, out: &mut B, dir: &StoreDir) {
        put_store_path(out, dir, &self.path);
        put_opt_store_path(out, dir, self.deriver.as_ref());
        put_store_path_set(out, dir, &self.references);
        out.put_word(self.nar_size);
        out.put_word(self.nar_size);
        out.put_str(&self.nar_hash.to_nix32_prefixed());
        out.put_str(self.ca.as_deref().unwrap_or(""));
        out.put_str_list(&self.sigs);
    }

    /// Whether the receiving store can rebuild everything this record says from the NAR
    /// alone, so that the worker protocol's `AddToStore` (by content) may carry it instead of
    /// `AddToStoreNar`: a `fixed:r:sha256` path whose content hash is its NAR hash and whose
    /// path follows from it (the `source` kind: `nix-store --add`, `builtins.path`, `./.` and
    /// flake sources), with nothing that route would drop: no deriver, no signatures, no
    /// references (Nix 2.4's daemon refuses references there, `src/libstore/daemon.cc`). The
    /// one field that differs on arrival is the registration time, which the receiving store
    /// then sets to its own clock.
    ///
    /// Why it matters: Nix 2.8's `LocalStore::addToStore` hashes a content-addressed NAR while
    /// unpacking it and then reads the unpacked path back to hash it again
    /// (`hashCAPath`), where `addToStoreFromDump` hashes once, because for `fixed:r:sha256`
    /// the content hash is the NAR hash (`src/libstore/local-store.cc`).
    pub fn is_plain_source(&self, dir: &StoreDir) -> bool {
        let Some(hash) = self
            .ca
            .as_deref()
            .and_then(|ca| ca.strip_prefix("fixed:r:"))
        else {
            return false;
        };
        self.deriver.is_none()
            && self.sigs.is_empty()
            && self.references.is_empty()
            && Hash::parse(hash, Some(HashAlgo::Sha256)).is_ok_and(|h| {
                h == self.nar_hash
                    && make_source_path(dir, &h, self.path.name()).is_ok_and(|p| p == self.path)
            })
    }

    /// Encodes the fields of serve `AddToStoreNar` (command 9) and worker `AddToStoreNar`
    /// (op 39): the same order in both, all present whatever the version.
    pub(crate) fn put_add_to_store_fields<B: BufMut + ?Sized>(&self, out: &mut B, dir: &StoreDir) {
        put_store_path(out, dir, &self.path);
        put_opt_store_path(out, dir, self.deriver.as_ref());
        out.put_str(&self.nar_hash.to_base16());
        put_store_path_set(out, dir, &self.references);
        out.put_time(self.registration_time);
        out.put_word(self.nar_size);
        out.put_flag(self.ultimate);
        out.put_str_list(&self.sigs);
        out.put_str(self.ca.as_deref().unwrap_or(""));
    }

    /// Decodes what [`PathInfo::put_add_to_store_fields`] writes (the server side).
    pub(crate) fn read_add_to_store_fields(
        r: &mut WireReader<'_>,
        dir: &StoreDir,
    ) -> ReadResult<Self> {
        let path = read_store_path(r, dir, "AddToStoreNar.path")?;
        let deriver = read_opt_store_path(r, dir, "AddToStoreNar.deriver")?;
        let nar_hash = read_nar_hash(r, "AddToStoreNar.narHash")?;
        let references = read_store_path_set(r, dir, "AddToStoreNar.references")?;
        let registration_time = r.read_time("AddToStoreNar.registrationTime")?;
        let nar_size = r.read_u64()?;
        let ultimate = r.read_bool()?;
        let sigs = read_sigs(r, "AddToStoreNar.sigs")?;
        let ca = read_ca(r, "AddToStoreNar.ca")?;
        Ok(PathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca,
        })
    }
}
