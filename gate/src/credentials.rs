//! The credentials file: users, their password hashes and roles.
//!
//! ```yaml
//! users:
//!   - name: alice                  # MQTT username, or the CN/SAN of a client certificate
//!     password_hash: "$argon2id$v=19$m=19456,t=2,p=1$..."   # argon2 (PHC string) or bcrypt ($2b$...)
//!     role: engineer               # admin | engineer | mapper | app
//!   - name: edgetwin-mapper-modbus
//!     role: mapper
//!     protocol: modbus             # required for a mapper, refused otherwise
//!     # no password_hash: this user can only log in with a client certificate
//! ```
//!
//! Passwords are checked with the hash crates' own verification (constant time in the hash).
//! [`hash_password`] makes argon2id hashes with the crate's default (OWASP) parameters;
//! [`add_user`] rewrites the file atomically (temp file in the same folder, fsync, rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use edgetwin_contract::ids::ProtocolName;
use serde::{Deserialize, Serialize};

use crate::acl::Role;

/// Why the credentials file cannot be read, checked or written.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file cannot be read.
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape.
    #[error("credentials file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the YAML parser said (with line and column).
        message: String,
    },
    /// Entries that break the rules, each with its path (`users[2].protocol: ...`).
    #[error("credentials file {path}: {}", .errors.join("; "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        errors: Vec<String>,
    },
    /// The password could not be hashed.
    #[error("cannot hash password: {0}")]
    Hash(String),
    /// The file cannot be written.
    #[error("cannot write credentials file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A role as spelled in the credentials file and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// Everything.
    Admin,
    /// Field engineer.
    Engineer,
    /// Protocol mapper (needs `protocol`).
    Mapper,
    /// Local application.
    App,
}

impl std::str::FromStr for RoleName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(RoleName::Admin),
            "engineer" => Ok(RoleName::Engineer),
            "mapper" => Ok(RoleName::Mapper),
            "app" => Ok(RoleName::App),
            _ => Err(format!(
                "unknown role `{s}` (expected admin, engineer, mapper or app)"
            )),
        }
    }
}

/// One user entry of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// MQTT username, or the identity (CN or DNS SAN) of a client certificate.
    pub name: String,
    /// argon2 PHC string or bcrypt hash; absent: certificate login only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// The role.
    pub role: RoleName,
    /// The protocol a mapper serves (mappers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolName>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    /// Every user.
    #[serde(default)]
    pub users: Vec<UserEntry>,
}

/// The role that goes with a role name and optional protocol, or why they do not fit together.
pub fn role_of(role: RoleName, protocol: Option<&ProtocolName>) -> Result<Role, String> {
    match (role, protocol) {
        (RoleName::Mapper, Some(p)) => Ok(Role::Mapper(p.clone())),
        (RoleName::Mapper, None) => Err("a mapper needs `protocol`".into()),
        (_, Some(_)) => Err("`protocol` is only for role mapper".into()),
        (RoleName::Admin, None) => Ok(Role::Admin),
        (RoleName::Engineer, None) => Ok(Role::Engineer),
        (RoleName::App, None) => Ok(Role::App),
    }
}

/// A stored password hash, already parsed.
#[derive(Debug, Clone)]
enum StoredHash {
    Argon2(String),
    Bcrypt(String),
}

/// A user ready for authentication.
#[derive(Debug, Clone)]
pub struct User {
    /// The role.
    pub role: Role,
    hash: Option<StoredHash>,
}

impl User {
    /// Does `password` match this user's hash? Slow on purpose (argon2/bcrypt): call it on a
    /// blocking thread. A user without a hash never matches.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        match &self.hash {
            None => false,
            Some(StoredHash::Argon2(h)) => PasswordHash::new(h)
                .map(|h| Argon2::default().verify_password(password, &h).is_ok())
                .unwrap_or(false),
            Some(StoredHash::Bcrypt(h)) => bcrypt::verify(password, h).unwrap_or(false),
        }
    }
}

/// Does the work of checking a real argon2 hash and throws the answer away, so an unknown user
/// name is refused no faster than a wrong password (no probing for user names by timing). Call it
/// on a blocking thread, like [`User::verify_password`].
pub fn verify_for_unknown_user(password: &[u8]) {
    static DUMMY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let hash = DUMMY.get_or_init(|| hash_password("edgetwin: no such user").ok());
    if let Some(h) = hash.as_deref().and_then(|h| PasswordHash::new(h).ok()) {
        let _ = Argon2::default().verify_password(password, &h);
    }
}

/// The users by name, as loaded from a credentials file.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    users: HashMap<String, User>,
}

impl Credentials {
    /// Reads and checks a credentials file; every problem is reported at once.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let file = read_file(path)?;
        Credentials::from_file(path, &file)
    }

    /// Checks a parsed file (`path` only names it in errors).
    pub fn from_file(path: &Path, file: &CredentialsFile) -> Result<Credentials, CredentialsError> {
        let mut errors = Vec::new();
        let mut users = HashMap::new();
        for (i, u) in file.users.iter().enumerate() {
            let at = format!("users[{i}]");
            if u.name.is_empty() {
                errors.push(format!("{at}.name: must not be empty"));
            }
            let role = match role_of(u.role, u.protocol.as_ref()) {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let hash = match &u.password_hash {
                None => None,
                Some(h) if h.starts_with("$argon2") => match PasswordHash::new(h) {
                    Ok(_) => Some(StoredHash::Argon2(h.clone())),
                    Err(e) => {
                        errors.push(format!("{at}.password_hash: not an argon2 hash: {e}"));
                        None
                    }
                },
                Some(h)
                    if ["$2a$", "$2b$", "$2x$", "$2y$"]
                        .iter()
                        .any(|p| h.starts_with(p)) =>
                {
                    Some(StoredHash::Bcrypt(h.clone()))
                }
                Some(_) => {
                    errors.push(format!(
                        "{at}.password_hash: neither argon2 ($argon2...) nor bcrypt ($2b$...)"
                    ));
                    None
                }
            };
            if users.insert(u.name.clone(), User { role, hash }).is_some() {
                errors.push(format!("{at}.name: `{}` appears twice", u.name));
            }
        }
        if errors.is_empty() {
            Ok(Credentials { users })
        } else {
            Err(CredentialsError::Invalid {
                path: path.to_path_buf(),
                errors,
            })
        }
    }

    /// The user called `name`.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn read_file(path: &Path) -> Result<CredentialsFile, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(CredentialsFile::default());
    }
    serde_norway::from_str(&text).map_err(|e| CredentialsError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// An argon2id hash (PHC string, random salt, the crate's default parameters) of `plain`.
pub fn hash_password(plain: &str) -> Result<String, CredentialsError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(plain.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CredentialsError::Hash(e.to_string()))
}

/// Adds user `name` (or replaces the entry of that name) to the credentials file at `path`,
/// creating the file if needed, and rewrites it atomically with mode 0600.
pub fn add_user(
    path: &Path,
    name: &str,
    role: RoleName,
    protocol: Option<ProtocolName>,
    plain: &str,
) -> Result<(), CredentialsError> {
    let mut file = if path.exists() {
        read_file(path)?
    } else {
        CredentialsFile::default()
    };
    let entry = UserEntry {
        name: name.to_string(),
        password_hash: Some(hash_password(plain)?),
        role,
        protocol,
    };
    match file.users.iter_mut().find(|u| u.name == name) {
        Some(u) => *u = entry,
        None => file.users.push(entry),
    }
    Credentials::from_file(path, &file)?;
    let yaml = serde_norway::to_string(&file).map_err(|e| CredentialsError::Hash(e.to_string()))?;
    write_atomically(path, yaml.as_bytes()).map_err(|source| CredentialsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable once the folder is synced.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn credentials_add_user_then_load_verifies_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        add_user(&path, "alice", RoleName::Engineer, None, "s3cret").unwrap();
        add_user(
            &path,
            "mb",
            RoleName::Mapper,
            Some(ProtocolName::new("modbus").unwrap()),
            "pw",
        )
        .unwrap();
        let c = Credentials::load(&path).unwrap();
        let alice = c.user("alice").unwrap();
        assert_eq!(alice.role, Role::Engineer);
        assert!(alice.verify_password(b"s3cret"));
        assert!(!alice.verify_password(b"wrong"));
        assert!(matches!(c.user("mb").unwrap().role, Role::Mapper(_)));
        // Replacing a user keeps one entry.
        add_user(&path, "alice", RoleName::App, None, "new").unwrap();
        let c = Credentials::load(&path).unwrap();
        assert_eq!(c.user("alice").unwrap().role, Role::App);
        assert!(c.user("alice").unwrap().verify_password(b"new"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn credentials_bcrypt_hashes_verify() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let file = CredentialsFile {
            users: vec![UserEntry {
                name: "b".into(),
                password_hash: Some(h),
                role: RoleName::Admin,
                protocol: None,
            }],
        };
        let c = Credentials::from_file(Path::new("x"), &file).unwrap();
        assert!(c.user("b").unwrap().verify_password(b"pw"));
        assert!(!c.user("b").unwrap().verify_password(b"pX"));
    }

    #[test]
    fn credentials_file_errors_are_all_reported_with_their_paths() {
        let yaml = "users:\n  - {name: a, role: mapper}\n  - {name: b, role: app, protocol: modbus}\n  - {name: c, role: admin, password_hash: plain}\n  - {name: c, role: admin}\n";
        let file: CredentialsFile = serde_norway::from_str(yaml).unwrap();
        let err = Credentials::from_file(Path::new("u.yaml"), &file).unwrap_err();
        let CredentialsError::Invalid { errors, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("users[0]"));
        assert!(errors[1].starts_with("users[1]"));
        assert!(errors[2].starts_with("users[2].password_hash"));
        assert!(errors[3].starts_with("users[3].name"));
    }

    #[test]
    fn credentials_unknown_fields_are_refused() {
        let r: Result<CredentialsFile, _> =
            serde_norway::from_str("users:\n  - {name: a, role: app, pasword: x}\n");
        assert!(r.is_err());
    }
}
