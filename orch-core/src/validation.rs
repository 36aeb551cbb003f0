//! Field-level validation errors and the name and label checks shared by every kind.

use std::fmt;

/// One refused field: its path (`spec.containers[0].name`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.replicas`.
    pub field: String,
    /// Why it was refused, e.g. `must be >= 0`.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Every field error found in one object; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationError {
    /// The refused fields, in the order they were checked.
    pub errors: Vec<FieldError>,
}

impl ValidationError {
    /// An error for one field.
    pub fn single(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError { errors: vec![FieldError { field: field.into(), reason: reason.into() }] }
    }

    /// True when the named field was refused (useful in tests and UIs).
    pub fn has_field(&self, field: &str) -> bool {
        self.errors.iter().any(|e| e.field == field)
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationError {}

/// Collects field errors while walking an object, tracking the current path.
#[derive(Debug, Default)]
pub struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    /// A validator with no errors yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is invalid because of `reason`.
    pub fn reject(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(FieldError { field: field.into(), reason: reason.into() });
    }

    /// Records `reason` against `field` when `ok` is false.
    pub fn check(&mut self, ok: bool, field: impl FnOnce() -> String, reason: &str) {
        if !ok {
            self.reject(field(), reason);
        }
    }

    /// Records the error of a check function against `field`, if any.
    pub fn check_with(&mut self, field: impl FnOnce() -> String, result: Result<(), String>) {
        if let Err(reason) = result {
            self.reject(field(), reason);
        }
    }

    /// True when nothing was rejected so far.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok(())` when nothing was rejected, otherwise every error.
    pub fn finish(self) -> Result<(), ValidationError> {
        if self.errors.is_empty() { Ok(()) } else { Err(ValidationError { errors: self.errors }) }
    }
}

fn is_alnum_lower(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Checks a DNS-1123 label: at most 63 lower-case letters, digits and `-`, starting and ending
/// with a letter or digit. Used for namespaces, container and port names.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("must be at most 63 characters (is {})", s.len()));
    }
    let b = s.as_bytes();
    if !b.iter().all(|&c| is_alnum_lower(c) || c == b'-') {
        return Err(format!("{s:?} must consist of lower-case letters, digits and '-'"));
    }
    if !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return Err(format!("{s:?} must start and end with a lower-case letter or digit"));
    }
    Ok(())
}

/// The longest DNS-1123 subdomain, and so the longest object name.
pub(crate) const MAX_SUBDOMAIN_LEN: usize = 253;

/// Checks a DNS-1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels. Used for
/// object names.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_SUBDOMAIN_LEN {
        return Err(format!("must be at most {MAX_SUBDOMAIN_LEN} characters (is {})", s.len()));
    }
    let b = s.as_bytes();
    if !b.iter().all(|&c| is_alnum_lower(c) || c == b'-' || c == b'.') {
        return Err(format!("{s:?} must consist of lower-case letters, digits, '-' and '.'"));
    }
    for part in s.split('.') {
        if part.is_empty() || !is_alnum_lower(part.as_bytes()[0]) || !is_alnum_lower(part.as_bytes()[part.len() - 1]) {
            return Err(format!(
                "{s:?} must be dot-separated parts that start and end with a lower-case letter or digit"
            ));
        }
    }
    Ok(())
}

fn qualified_name_part(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("name part must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("name part must be at most 63 characters (is {})", s.len()));
    }
    let b = s.as_bytes();
    let ok_char = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.';
    if !b.iter().all(|&c| ok_char(c)) {
        return Err(format!("{s:?} must consist of letters, digits, '-', '_' and '.'"));
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err(format!("{s:?} must start and end with a letter or digit"));
    }
    Ok(())
}

/// Checks a qualified name (`example.com/name` or `name`): label and annotation keys, finalizers,
/// extended resource names.
pub fn qualified_name(s: &str) -> Result<(), String> {
    match s.split_once('/') {
        Some((prefix, name)) => {
            dns1123_subdomain(prefix).map_err(|e| format!("prefix: {e}"))?;
            qualified_name_part(name)
        }
        None => qualified_name_part(s),
    }
}

/// Checks a label value: empty, or at most 63 letters, digits, `-`, `_`, `.`, starting and ending
/// with a letter or digit.
pub fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    qualified_name_part(s).map_err(|e| e.replacen("name part", "value", 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        assert!(dns1123_label("web-1").is_ok());
        assert!(dns1123_label("-web").is_err());
        assert!(dns1123_label("Web").is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_subdomain("a.b-c.d").is_ok());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(dns1123_subdomain("").is_err());
        assert!(qualified_name("orch.dev/gpu").is_ok());
        assert!(qualified_name("app").is_ok());
        assert!(qualified_name("Bad Key").is_err());
        assert!(qualified_name("/x").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_b").is_ok());
        assert!(label_value("-x").is_err());
    }

    #[test]
    fn display_lists_every_field() {
        let mut v = Validator::new();
        v.reject("spec.replicas", "must be >= 0");
        v.reject("metadata.name", "must not be empty");
        let e = v.finish().unwrap_err();
        assert_eq!(e.to_string(), "spec.replicas: must be >= 0; metadata.name: must not be empty");
        assert!(e.has_field("metadata.name"));
    }
}
