//! The token store: agent tokens and API tokens, kept as SHA-256 hashes in one JSON file.
//!
//! Tokens are 256 random bits, so a fast hash is enough (no KDF needed): a leaked store does
//! not reveal usable tokens. Agent and API tokens live in separate namespaces (the `kind` is
//! part of what is matched), so one can never stand in for the other. The gateway re-reads the
//! file when it changes, so `token create` and `token revoke` take effect without a restart.

use std::collections::HashMap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The namespace a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Used by an agent to connect; carries the agent's name.
    Agent,
    /// Used by a caller of the tunnel API; may be limited to some agents.
    Api,
}

impl TokenKind {
    /// The kind as people say it: "agent", "API".
    pub fn label(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Api => "API",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::Agent => "aga_",
            Self::Api => "agk_",
        }
    }
}

/// One stored token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Short public id, for `token list` and `token revoke`.
    pub id: String,
    pub kind: TokenKind,
    /// Agent name (agent tokens) or caller name (API tokens).
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// API tokens only: the agents this token may reach; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Seconds since the Unix epoch after which the token is refused, and what it
    /// authenticated ends (as for a revoked token). None: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl TokenEntry {
    /// Whether the token has expired.
    pub fn expired(&self) -> bool {
        self.expires_at.is_some_and(|at| unix_now() >= at)
    }

    /// Whether this (API) token may reach `agent`.
    pub fn allows_agent(&self, agent: &str) -> bool {
        self.agents.is_empty() || self.agents.iter().any(|a| a == agent)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token store {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token store {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write token store {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid name {0:?}: use 1-63 characters from [A-Za-z0-9._-]")]
    InvalidName(String),
    #[error("no token with id or name {0:?}")]
    NotFound(String),
    #[error(
        "token store {0} does not exist; check the path (`token create` makes it with the first \
         token)"
    )]
    Missing(PathBuf),
    #[error("the token to import must be at least {0} characters with no white space inside")]
    WeakImport(usize),
    #[error("this token is already in the store; revoke the old entry first to rename it")]
    DuplicateImport,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The store's contents; a missing file is an empty store when `missing_is_empty` (a store
/// tokens are yet to be created in), and [`TokenError::Missing`] otherwise.
fn read_file_or(path: &Path, missing_is_empty: bool) -> Result<TokenFile, TokenError> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !missing_is_empty => {
            Err(TokenError::Missing(path.to_path_buf()))
        }
        other => parse_read(path, other),
    }
}

fn read_file(path: &Path) -> Result<TokenFile, TokenError> {
    parse_read(path, std::fs::read(path))
}

fn parse_read(path: &Path, read: std::io::Result<Vec<u8>>) -> Result<TokenFile, TokenError> {
    match read {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| TokenError::Parse {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile {
            version: 1,
            tokens: vec![],
        }),
        Err(source) => Err(TokenError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_file(path: &Path, file: &TokenFile) -> Result<(), TokenError> {
    let err = |source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(file).expect("token file serializes");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(err)?;
        #[cfg(unix)]
        keep_owner_and_mode(path, &f).map_err(err)?;
        f.write_all(&data).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// The rewritten store keeps the old file's owner, group and mode (group bits at most), so
/// root running `agentgate token create` on a packaged install leaves a store the gateway's
/// own user can still read. A new store is 0600, owned by whoever created it.
#[cfg(unix)]
fn keep_owner_and_mode(path: &Path, new: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(old) = std::fs::metadata(path) else {
        return Ok(());
    };
    if old.uid() != new.metadata()?.uid() || old.gid() != new.metadata()?.gid() {
        std::os::unix::fs::fchown(new, Some(old.uid()), Some(old.gid()))?;
    }
    new.set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o660))
}

/// Creates a token, stores its hash, and returns the token (the only time it is visible).
pub fn create_token(
    path: &Path,
    kind: TokenKind,
    name: &str,
    agents: &[String],
) -> Result<(String, TokenEntry), TokenError> {
    create_token_expiring(path, kind, name, agents, None)
}

/// Like [`create_token`], refused (and ending what it authenticated) once `expires_in` has
/// passed.
pub fn create_token_expiring(
    path: &Path,
    kind: TokenKind,
    name: &str,
    agents: &[String],
    expires_in: Option<Duration>,
) -> Result<(String, TokenEntry), TokenError> {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!(
        "{}{}",
        kind.prefix(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let expires_at = expires_in.map(|d| unix_now() + d.as_secs().max(1));
    store_token(path, kind, name, agents, token, expires_at)
}

/// Creates one agent token per name in a single write of the store (a fleet provisioned at
/// once, or the cluster benchmark's 18,000 agents); returns the tokens in the same order.
pub fn create_agent_tokens(path: &Path, names: &[String]) -> Result<Vec<String>, TokenError> {
    if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
        return Err(TokenError::InvalidName(bad.clone()));
    }
    let mut file = read_file(path)?;
    let now = unix_now();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let token = format!(
            "{}{}",
            TokenKind::Agent.prefix(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let mut id = [0u8; 6];
        rand::rng().fill_bytes(&mut id);
        file.tokens.push(TokenEntry {
            id: format!("tok_{}", hex::encode(id)),
            kind: TokenKind::Agent,
            name: name.clone(),
            sha256: hash(&token),
            created_at: now,
            agents: vec![],
            expires_at: None,
        });
        out.push(token);
    }
    file.version = 1;
    write_file(path, &file)?;
    Ok(out)
}

/// Stores the hash of a token that already exists elsewhere, such as the token file of an
/// agentk that moves here from kas unchanged. Surrounding white space is not part of it
/// (agentk trims its token file the same way).
pub fn import_token(
    path: &Path,
    kind: TokenKind,
    name: &str,
    agents: &[String],
    value: &str,
) -> Result<TokenEntry, TokenError> {
    let value = value.trim();
    if value.len() < MIN_IMPORTED_LEN || value.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(TokenError::WeakImport(MIN_IMPORTED_LEN));
    }
    if read_file(path)?
        .tokens
        .iter()
        .any(|t| t.sha256 == hash(value))
    {
        return Err(TokenError::DuplicateImport);
    }
    store_token(path, kind, name, agents, value.to_string(), None).map(|(_, e)| e)
}

/// The shortest token `import_token` takes: GitLab agent tokens are 50 characters and more.
pub const MIN_IMPORTED_LEN: usize = 20;

fn store_token(
    path: &Path,
    kind: TokenKind,
    name: &str,
    agents: &[String],
    token: String,
    expires_at: Option<u64>,
) -> Result<(String, TokenEntry), TokenError> {
    if !valid_name(name) {
        return Err(TokenError::InvalidName(name.into()));
    }
    if let Some(bad) = agents.iter().find(|a| !valid_name(a)) {
        return Err(TokenError::InvalidName(bad.clone()));
    }
    let mut file = read_file(path)?;
    let mut id = [0u8; 6];
    rand::rng().fill_bytes(&mut id);
    let entry = TokenEntry {
        id: format!("tok_{}", hex::encode(id)),
        kind,
        name: name.to_string(),
        sha256: hash(&token),
        created_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        agents: if kind == TokenKind::Api {
            agents.to_vec()
        } else {
            vec![]
        },
        expires_at,
    };
    file.version = 1;
    file.tokens.push(entry.clone());
    write_file(path, &file)?;
    Ok((token, entry))
}

/// Lists stored tokens.
pub fn list_tokens(path: &Path) -> Result<Vec<TokenEntry>, TokenError> {
    Ok(read_file_or(path, false)?.tokens)
}

/// Removes the tokens whose id is `id_or_name`, or else all tokens named `id_or_name`.
/// Returns what was removed.
pub fn revoke_tokens(path: &Path, id_or_name: &str) -> Result<Vec<TokenEntry>, TokenError> {
    let mut file = read_file_or(path, false)?;
    let by_id = file.tokens.iter().any(|t| t.id == id_or_name);
    let (gone, kept): (Vec<_>, Vec<_>) = file.tokens.into_iter().partition(|t| {
        if by_id {
            t.id == id_or_name
        } else {
            t.name == id_or_name
        }
    });
    if gone.is_empty() {
        return Err(TokenError::NotFound(id_or_name.into()));
    }
    file.tokens = kept;
    write_file(path, &file)?;
    Ok(gone)
}

/// What identifies one version of the file on disk.
type FileStamp = Option<(SystemTime, u64)>;

#[derive(Default)]
struct Loaded {
    stamp: FileStamp,
    /// Shared, so that a request holds its token's entry without copying its strings.
    by_hash: HashMap<(TokenKind, String), Arc<TokenEntry>>,
}

/// How soon a token store that could not be read (not one that did not parse) is read again.
const RETRY_UNREADABLE: Duration = Duration::from_secs(2);

/// A load of the token store that failed.
struct FailedLoad {
    stamp: FileStamp,
    /// The file was read but did not parse: the same version will not parse either.
    unparsable: bool,
    at: Instant,
}

/// The gateway's view of the token store, reloaded when the file changes.
pub struct TokenStore {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    last_check: Mutex<Instant>,
    /// The last load that failed. Unknown tokens make the store look at its file, and a broken
    /// file must not turn each of them into a read and an error line: a version that did not
    /// parse is not read again until the file changes; one that could not be read (permissions,
    /// no file descriptor free) is tried again after [`RETRY_UNREADABLE`], since fixing that
    /// changes nothing in the file's stamp. Each failure is logged once per version.
    failed: Mutex<Option<FailedLoad>>,
    /// Reloads that failed, since start.
    failed_reloads: AtomicU64,
    /// How often the file's stamp is checked at most.
    recheck: Duration,
    /// One signal per token id that authenticated something still alive (a session, a
    /// tunnel, a call): cancelled when a reload finds the token gone. Bounded by the tokens in
    /// the store: an id enters only after it verified, and leaves when it is revoked.
    revocations: Mutex<HashMap<String, (String, CancellationToken)>>,
    /// Tokens found revoked while something they authenticated was alive.
    revoked_live: AtomicU64,
}

impl TokenStore {
    /// Opens the store; a missing file is an empty store (tokens can be created later).
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let store = Self {
            path: path.to_path_buf(),
            loaded: RwLock::default(),
            last_check: Mutex::new(Instant::now()),
            failed: Mutex::new(None),
            failed_reloads: AtomicU64::new(0),
            recheck: Duration::from_millis(250),
            revocations: Mutex::default(),
            revoked_live: AtomicU64::new(0),
        };
        store.reload(true)?;
        Ok(store)
    }

    fn stamp(&self) -> FileStamp {
        let m = std::fs::metadata(&self.path).ok()?;
        Some((m.modified().ok()?, m.len()))
    }

    /// Reads the file again. Once running, a missing file is an error, not an empty store:
    /// a file deleted and written again (a non-atomic deploy) must not revoke every session.
    fn reload(&self, missing_is_empty: bool) -> Result<(), TokenError> {
        let stamp = self.stamp();
        let file = read_file_or(&self.path, missing_is_empty)?;
        let by_hash = file
            .tokens
            .into_iter()
            .map(|t| ((t.kind, t.sha256.clone()), Arc::new(t)))
            .collect::<HashMap<_, _>>();
        tracing::info!(path = %self.path.display(), tokens = by_hash.len(), "token store loaded");
        *self.loaded.write().unwrap() = Loaded { stamp, by_hash };
        self.end_what_is_no_longer_valid();
        Ok(())
    }

    /// Cancels the signals of tokens that are gone from the store or have expired.
    fn end_what_is_no_longer_valid(&self) {
        let valid: HashSet<String> = self
            .loaded
            .read()
            .unwrap()
            .by_hash
            .values()
            .filter(|t| !t.expired())
            .map(|t| t.id.clone())
            .collect();
        let mut revocations = self.revocations.lock().unwrap();
        revocations.retain(|id, (name, signal)| {
            if valid.contains(id) {
                return true;
            }
            tracing::warn!(
                token_id = %id,
                name = %name,
                "token revoked or expired: ending the sessions, tunnels and calls it authenticated"
            );
            self.revoked_live.fetch_add(1, Ordering::Relaxed);
            signal.cancel();
            false
        });
    }

    /// Checks the file now (the periodic check and SIGHUP), instead of at the next
    /// authentication: a revoked token must bite even when nobody authenticates.
    pub fn check_now(&self) {
        *self.last_check.lock().unwrap() = Instant::now();
        self.reload_if_changed();
        // Expiry is not a change of the file.
        self.end_what_is_no_longer_valid();
    }

    /// Reloads the store if its file changed since it was loaded (one `stat`).
    fn reload_if_changed(&self) {
        let stamp = self.stamp();
        let mut failed = self.failed.lock().unwrap();
        if stamp == self.loaded.read().unwrap().stamp {
            // The file is the version in use again (put back after a failed reload, say):
            // the failure is over.
            if failed.take().is_some() {
                tracing::info!(
                    path = %self.path.display(),
                    "token store file is back as it was loaded; the failed reload is over"
                );
            }
            return;
        }
        let same_version = failed.as_ref().filter(|f| f.stamp == stamp);
        if same_version.is_some_and(|f| f.unparsable || f.at.elapsed() < RETRY_UNREADABLE) {
            return;
        }
        let logged = same_version.is_some();
        match self.reload(false) {
            Ok(()) => *failed = None,
            Err(e) => {
                self.failed_reloads.fetch_add(1, Ordering::Relaxed);
                *failed = Some(FailedLoad {
                    stamp,
                    unparsable: matches!(e, TokenError::Parse { .. }),
                    at: Instant::now(),
                });
                if !logged {
                    tracing::error!(
                        error = %e,
                        "token store reload failed; keeping the previous one until it can be \
                         read"
                    );
                }
            }
        }
    }

    /// Cancelled when the token `entry` names is revoked (or removed from the file).
    pub fn revocation(&self, entry: &TokenEntry) -> CancellationToken {
        let mut revocations = self.revocations.lock().unwrap();
        // Every authenticated call asks: look up first, allocate only the first time.
        if let Some((_, signal)) = revocations.get(&entry.id) {
            return signal.clone();
        }
        let signal = CancellationToken::new();
        revocations.insert(entry.id.clone(), (entry.name.clone(), signal.clone()));
        signal
    }

    /// Reloads that failed since start (each version of a broken file fails once).
    pub fn failed_reloads(&self) -> u64 {
        self.failed_reloads.load(Ordering::Relaxed)
    }

    /// Whether the last reload failed (the tokens loaded before it are in use).
    pub fn reload_failing(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Whether the store holds no token at all.
    pub fn is_empty(&self) -> bool {
        self.loaded.read().unwrap().by_hash.is_empty()
    }

    /// Tokens found revoked while something they authenticated was alive, since start.
    pub fn revoked_live(&self) -> u64 {
        self.revoked_live.load(Ordering::Relaxed)
    }

    /// Looks at the file if `recheck` has passed since the last look; whether it looked.
    fn refresh_if_changed(&self) -> bool {
        {
            let mut last = self.last_check.lock().unwrap();
            if last.elapsed() < self.recheck {
                return false;
            }
            *last = Instant::now();
        }
        self.reload_if_changed();
        true
    }

    /// The entry for `token` in namespace `kind`, if it is valid.
    ///
    /// A token the loaded store does not hold sends a look at the file at once (unless this
    /// call just looked), even within `recheck`: it may have been created a moment ago (`agentgate token create`, then a
    /// call with it). That costs one `stat` per unknown token, far less than the connection
    /// and request that brought it; a known token only looks every `recheck`.
    pub fn verify(&self, kind: TokenKind, token: &str) -> Option<Arc<TokenEntry>> {
        let looked = self.refresh_if_changed();
        let key = (kind, hash(token));
        let lookup = || {
            self.loaded
                .read()
                .unwrap()
                .by_hash
                .get(&key)
                .filter(|t| !t.expired())
                .cloned()
        };
        lookup().or_else(|| {
            if looked {
                return None;
            }
            self.reload_if_changed();
            lookup()
        })
    }

    /// Whether any agent token carries `name` (the agent is "known", connected or not). As
    /// in [`Self::verify`], a name the loaded store does not hold sends a look at the file.
    pub fn agent_known(&self, name: &str) -> bool {
        let looked = self.refresh_if_changed();
        let known = || {
            self.loaded
                .read()
                .unwrap()
                .by_hash
                .values()
                .any(|t| t.kind == TokenKind::Agent && t.name == name)
        };
        known()
            || (!looked && {
                self.reload_if_changed();
                known()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_a_token_cancels_its_signal_and_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let (gone, _) = create_token(&path, TokenKind::Agent, "gone", &[]).unwrap();
        let (kept, _) = create_token(&path, TokenKind::Agent, "kept", &[]).unwrap();
        let store = TokenStore::open(&path).unwrap();
        let gone_entry = store.verify(TokenKind::Agent, &gone).unwrap();
        let kept_entry = store.verify(TokenKind::Agent, &kept).unwrap();
        let (gone_signal, kept_signal) =
            (store.revocation(&gone_entry), store.revocation(&kept_entry));
        // The file's stamp must change: same length, so wait out a coarse mtime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        revoke_tokens(&path, "gone").unwrap();
        store.check_now();
        assert!(gone_signal.is_cancelled(), "the revoked token's signal");
        assert!(!kept_signal.is_cancelled(), "another token's signal");
        assert_eq!(store.revoked_live(), 1);
        assert!(store.verify(TokenKind::Agent, &gone).is_none());
    }

    #[test]
    fn a_store_file_that_vanishes_keeps_the_tokens_until_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let (tok, _) = create_token(&path, TokenKind::Agent, "kept", &[]).unwrap();
        let store = TokenStore::open(&path).unwrap();
        let signal = store.revocation(&store.verify(TokenKind::Agent, &tok).unwrap());
        let saved = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        store.check_now();
        assert!(!signal.is_cancelled(), "a deleted file revoked the session");
        assert!(store.verify(TokenKind::Agent, &tok).is_some());
        assert_eq!(store.failed_reloads(), 1);
        assert!(matches!(list_tokens(&path), Err(TokenError::Missing(_))));
        std::fs::write(&path, saved).unwrap();
        store.check_now();
        assert!(!signal.is_cancelled());
        assert!(store.verify(TokenKind::Agent, &tok).is_some());
    }

    #[test]
    fn a_broken_store_is_read_once_per_version_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let (tok, _) = create_token(&path, TokenKind::Agent, "kept", &[]).unwrap();
        let store = TokenStore::open(&path).unwrap();
        std::fs::write(&path, "{ not json").unwrap();
        // Unknown tokens make the store look at its file; the broken version fails once.
        for _ in 0..100 {
            assert!(store.verify(TokenKind::Agent, "aga_unknown").is_none());
        }
        assert_eq!(store.failed_reloads(), 1);
        assert!(
            store.verify(TokenKind::Agent, &tok).is_some(),
            "the old store is kept"
        );
        // A new version of the file is read again.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::remove_file(&path).unwrap();
        let (new, _) = create_token(&path, TokenKind::Agent, "new", &[]).unwrap();
        assert_eq!(store.verify(TokenKind::Agent, &new).unwrap().name, "new");
        assert_eq!(store.failed_reloads(), 1);
    }

    #[test]
    fn a_rewritten_store_keeps_its_owner_group_and_mode() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        create_token(&path, TokenKind::Agent, "first", &[]).unwrap();
        let fresh = std::fs::metadata(&path).unwrap();
        assert_eq!(fresh.mode() & 0o777, 0o600, "a new store is private");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        // As root (CI, a packaged install): hand the store to another user, as the package
        // does with its own, and create a token as root.
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        }
        create_token(&path, TokenKind::Agent, "second", &[]).unwrap();
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(after.mode() & 0o777, 0o640);
        if as_root {
            assert_eq!((after.uid(), after.gid()), (65534, 65534));
        }
        assert_eq!(read_file(&path).unwrap().tokens.len(), 2);
    }

    #[test]
    fn imported_token_verifies_and_only_its_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let value = "glagent-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefgh";
        let e = import_token(
            &path,
            TokenKind::Agent,
            "kas-agent",
            &[],
            &format!("{value}\n"),
        )
        .unwrap();
        assert_eq!(e.name, "kas-agent");
        let store = TokenStore::open(&path).unwrap();
        assert_eq!(store.verify(TokenKind::Agent, value).unwrap().id, e.id);
        assert!(store.verify(TokenKind::Api, value).is_none());
        assert!(!std::fs::read_to_string(&path).unwrap().contains(value));
        assert!(matches!(
            import_token(&path, TokenKind::Agent, "again", &[], value),
            Err(TokenError::DuplicateImport)
        ));
        assert!(matches!(
            import_token(&path, TokenKind::Agent, "short", &[], "abc"),
            Err(TokenError::WeakImport(_))
        ));
    }

    #[test]
    fn create_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let (agent_tok, e) = create_token(&path, TokenKind::Agent, "edge-1", &[]).unwrap();
        assert!(agent_tok.starts_with("aga_"));
        let (api_tok, _) =
            create_token(&path, TokenKind::Api, "ci", &["edge-1".to_string()]).unwrap();
        // Only hashes are stored.
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(!raw.contains(&agent_tok) && raw.contains(&e.sha256));

        let store = TokenStore::open(&path).unwrap();
        assert_eq!(
            store.verify(TokenKind::Agent, &agent_tok).unwrap().name,
            "edge-1"
        );
        // Namespaces are separate.
        assert!(store.verify(TokenKind::Api, &agent_tok).is_none());
        assert!(store.verify(TokenKind::Agent, &api_tok).is_none());
        let api = store.verify(TokenKind::Api, &api_tok).unwrap();
        assert!(api.allows_agent("edge-1") && !api.allows_agent("edge-2"));
        assert!(store.agent_known("edge-1") && !store.agent_known("ci"));

        let gone = revoke_tokens(&path, &e.id).unwrap();
        assert_eq!(gone.len(), 1);
        std::thread::sleep(Duration::from_millis(300));
        assert!(store.verify(TokenKind::Agent, &agent_tok).is_none());
        assert!(matches!(
            revoke_tokens(&path, "nope"),
            Err(TokenError::NotFound(_))
        ));
    }

    #[test]
    fn a_token_created_after_the_last_look_works_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        create_token(&path, TokenKind::Agent, "old", &[]).unwrap();
        let store = TokenStore::open(&path).unwrap();
        // The store looked at its file just now, so `recheck` (250 ms) has not passed.
        assert!(store.verify(TokenKind::Api, "nothing-yet").is_none());
        let (api_tok, _) = create_token(&path, TokenKind::Api, "ci", &[]).unwrap();
        let (agent_tok, _) = create_token(&path, TokenKind::Agent, "new", &[]).unwrap();
        assert_eq!(store.verify(TokenKind::Api, &api_tok).unwrap().name, "ci");
        assert!(store.agent_known("new"));
        assert_eq!(
            store.verify(TokenKind::Agent, &agent_tok).unwrap().name,
            "new"
        );
        // A token still unknown stays refused.
        assert!(store.verify(TokenKind::Api, "nothing-yet").is_none());
    }

    #[test]
    fn rejects_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        assert!(create_token(&path, TokenKind::Agent, "a b", &[]).is_err());
        assert!(create_token(&path, TokenKind::Agent, "", &[]).is_err());
    }
}
