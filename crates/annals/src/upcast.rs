//! Upcasting: reading events stored by older versions of the application.
//! The public documentation is on [`Upcasters`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::error::UpcastFailure;
use crate::{DomainEvent, Error, Payload, RecordedEvent, Result};

/// An error of a payload transform, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A payload transform: the stored payload in, the next version's out.
type Transform = dyn Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync;

/// A transform standing for a run of consecutive steps (a plan's chain
/// compiled into one filter): the first step's input in, the last step's
/// output out. It borrows its input, so that when it fails the steps can be
/// run one by one on the same payload to name the failing one.
pub(crate) type ChainTransform =
    dyn Fn(ChainInput<'_>) -> std::result::Result<ChainOutput, BoxError> + Send + Sync;

/// The output of a [`ChainTransform`]: the last step's payload as a value,
/// or already written as the payload that value makes
/// ([`Payload::from_value`], which must not fail on it). Only plans (feature
/// `plan`) make chains.
#[cfg_attr(not(feature = "plan"), allow(dead_code))]
pub(crate) enum ChainOutput {
    /// A payload value.
    Value(Value),
    /// The payload.
    Payload(Payload),
}

/// The input of a [`ChainTransform`]: a payload already parsed (by an
/// earlier step), or the stored payload's JSON text, which the transform
/// must treat as the value serde_json reads from it (and fail where
/// serde_json fails).
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "plan"), allow(dead_code))]
pub(crate) enum ChainInput<'a> {
    /// A payload value.
    Value(&'a Value),
    /// A stored payload's text.
    Json(&'a str),
}

/// A [`ChainTransform`] attached to the first step of the run it covers.
#[derive(Clone)]
pub(crate) struct Fused {
    /// The transforms of the steps covered, this step's first: the registry
    /// keeps the chain transform only if its chain from this step goes
    /// through exactly these (a plan's steps can be taken one by one into a
    /// builder with other steps).
    covers: Vec<Arc<Transform>>,
    /// The type name after the last covered step.
    target: String,
    transform: Arc<ChainTransform>,
}

/// The `(type, current version)` pairs of an event enum: every name in
/// [`DomainEvent::EVENT_TYPES`] (aliases included) with its
/// [`current_version`](DomainEvent::current_version). What
/// [`UpcastersBuilder::build`] validates a registry against; concatenate
/// the lists of several enums for a store that holds them all. An alias is
/// listed as a type of its own: an alias of a variant above version 1 needs
/// its own chain too (or [`UpcastersBuilder::introduced_at`]), since events
/// stored under the old name may be at any of its versions.
pub fn current_versions<E: DomainEvent>() -> Vec<(&'static str, u32)> {
    E::EVENT_TYPES
        .iter()
        .map(|&t| (t, E::current_version(t).unwrap_or(1)))
        .collect()
}

/// One upcasting step: events of `event_type` stored at `from_version` become
/// events of version `from_version + 1`, of the same type or of
/// [`rename_to`](Step::rename_to)'s.
#[derive(Clone)]
pub struct Step {
    event_type: String,
    from_version: u32,
    rename_to: Option<String>,
    transform: Option<Arc<Transform>>,
    label: Option<String>,
    fused: Option<Fused>,
}

impl Step {
    /// A step with a payload transform. The transform gets the stored
    /// payload (`null` for a unit variant) and returns the next version's;
    /// its error is reported as [`Error::Upcast`] naming the event.
    pub fn new<F, E>(event_type: impl Into<String>, from_version: u32, transform: F) -> Self
    where
        F: Fn(Value) -> std::result::Result<Value, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        Step {
            event_type: event_type.into(),
            from_version,
            rename_to: None,
            transform: Some(Arc::new(move |v| transform(v).map_err(Into::into))),
            label: None,
            fused: None,
        }
    }

    /// A step that changes only the version (and, with
    /// [`rename_to`](Step::rename_to), the type name): the payload is kept
    /// as stored and not even parsed. For a change the new code reads
    /// tolerantly (a field with a serde default) that still bumps the
    /// version.
    pub fn relabel(event_type: impl Into<String>, from_version: u32) -> Self {
        Step {
            event_type: event_type.into(),
            from_version,
            rename_to: None,
            transform: None,
            label: None,
            fused: None,
        }
    }

    /// Attaches `transform`, standing for this step followed by `rest` (the
    /// steps its chain goes through next, in order, each with a payload
    /// transform) and ending at type `target`. The registry runs it instead
    /// of the steps one by one when they are its chain, and runs the steps
    /// one by one when it fails. (Only plans fuse their steps.)
    #[cfg(feature = "plan")]
    pub(crate) fn fuse(
        mut self,
        rest: &[&Step],
        target: String,
        transform: Arc<ChainTransform>,
    ) -> Self {
        let covers = std::iter::once(&self)
            .chain(rest.iter().copied())
            .map(|s| s.transform.clone())
            .collect::<Option<Vec<_>>>();
        self.fused = covers.map(|covers| Fused {
            covers,
            target,
            transform,
        });
        self
    }

    /// This step without its chain transform.
    #[cfg(all(test, feature = "plan"))]
    pub(crate) fn unfused(mut self) -> Self {
        self.fused = None;
        self
    }

    /// The event's type name after this step.
    pub fn rename_to(mut self, event_type: impl Into<String>) -> Self {
        self.rename_to = Some(event_type.into());
        self
    }

    /// Where the step comes from, for error messages (a plan file's step,
    /// for example). Defaults to `TYPE vN`.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The type name this step reads.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The stored version this step reads.
    pub fn from_version(&self) -> u32 {
        self.from_version
    }

    pub(crate) fn target_type(&self) -> &str {
        self.rename_to.as_deref().unwrap_or(&self.event_type)
    }

    fn describe(&self) -> String {
        match &self.label {
            Some(label) => label.clone(),
            None => format!("{} v{}", self.event_type, self.from_version),
        }
    }
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("event_type", &self.event_type)
            .field("from_version", &self.from_version)
            .field("rename_to", &self.rename_to)
            .field("transforms_payload", &self.transform.is_some())
            .finish()
    }
}

/// Why a registry could not be built. Raised by
/// [`UpcastersBuilder::build`], before any event is read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    /// A chain has a hole: events of `event_type` at `from_version` would
    /// have no way to `to_version` (and on to the current version). Add the
    /// step, or declare where the type's history starts
    /// ([`UpcastersBuilder::introduced_at`]).
    #[error("no upcaster for event type {event_type:?} from version {from_version} to version {to_version}")]
    MissingStep {
        /// The type whose chain has the hole.
        event_type: String,
        /// The version with no step.
        from_version: u32,
        /// The version the missing step would produce.
        to_version: u32,
    },
    /// Two steps read the same `(type, version)`.
    #[error("two upcasters for event type {event_type:?} version {from_version}")]
    DuplicateStep {
        /// The type.
        event_type: String,
        /// The version both steps read.
        from_version: u32,
    },
    /// A step reads a version at or above the type's current version, which
    /// the application writes today (or a step from version 0).
    #[error("an upcaster for event type {event_type:?} reads version {from_version}, but the current version is {current}")]
    StepBeyondCurrent {
        /// The type.
        event_type: String,
        /// The version the step reads.
        from_version: u32,
        /// The type's current version (0 for a step from version 0).
        current: u32,
    },
    /// A chain ends at a type the application does not read: the step
    /// producing `(event_type, version)` renames to, or keeps, a name that
    /// has no current version and no further step.
    #[error("upcasters lead event type {event_type:?} to version {version}, which the application does not read and no step continues")]
    DeadEnd {
        /// The type name the chain arrives at.
        event_type: String,
        /// The version it arrives at.
        version: u32,
    },
}

/// Builds an [`Upcasters`] registry; see [`Upcasters::builder`].
#[derive(Debug, Default, Clone)]
pub struct UpcastersBuilder {
    steps: Vec<Step>,
    introduced: Vec<(String, u32)>,
}

impl UpcastersBuilder {
    /// Adds a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Adds steps.
    pub fn steps(mut self, steps: impl IntoIterator<Item = Step>) -> Self {
        self.steps.extend(steps);
        self
    }

    /// Declares that events of `event_type` were first stored at `version`,
    /// so no chain is required below it (by default a type's chain starts at
    /// version 1, or at the lowest version a rename leads to it).
    pub fn introduced_at(mut self, event_type: impl Into<String>, version: u32) -> Self {
        self.introduced.push((event_type.into(), version));
        self
    }

    /// Validates the steps against the application's current versions
    /// (`(type, current version)` pairs, see [`current_versions`]) and builds
    /// the registry. Every declared type at a current version above its
    /// first must have one step per version up to the current one; every
    /// chain must end at a declared type's current version.
    pub fn build(self, current: &[(&str, u32)]) -> Result<Upcasters, UpcastError> {
        let declared: Vec<&str> = current.iter().map(|&(t, _)| t).collect();
        let current: HashMap<&str, u32> = current.iter().copied().collect();
        self.validate(&declared, |t| current.get(t).copied())
    }

    /// [`build`](UpcastersBuilder::build) against the current versions of
    /// one event enum.
    pub fn build_for<E: DomainEvent>(self) -> Result<Upcasters, UpcastError> {
        self.build(&current_versions::<E>())
    }

    /// Builds the registry for a tool that reads events without the
    /// application's event types (the `annals` CLI with `--plan` and no
    /// registered aggregate): each chain's end is taken as current. Still
    /// refuses duplicate steps and holes inside a chain.
    pub fn build_without_types(self) -> Result<Upcasters, UpcastError> {
        // The current version of a type is one above its highest step; a
        // type reached only by renames is current where they land highest.
        let mut ends: HashMap<String, u32> = HashMap::new();
        for s in &self.steps {
            let top = ends.entry(s.event_type.clone()).or_insert(0);
            *top = (*top).max(s.from_version.saturating_add(1));
        }
        for s in &self.steps {
            if s.rename_to.is_some() {
                let landing = s.from_version.saturating_add(1);
                let top = ends.entry(s.target_type().to_owned()).or_insert(0);
                *top = (*top).max(landing);
            }
        }
        let declared: Vec<String> = ends.keys().cloned().collect();
        let declared: Vec<&str> = declared.iter().map(String::as_str).collect();
        self.validate(&declared, |t| ends.get(t).copied())
    }

    fn validate(
        self,
        declared: &[&str],
        current: impl Fn(&str) -> Option<u32>,
    ) -> Result<Upcasters, UpcastError> {
        let mut types: HashMap<String, TypeSteps> = HashMap::new();
        for step in &self.steps {
            let entry = types
                .entry(step.event_type.clone())
                .or_insert_with(|| TypeSteps {
                    current: current(&step.event_type),
                    steps: BTreeMap::new(),
                });
            if step.from_version == 0 {
                return Err(UpcastError::StepBeyondCurrent {
                    event_type: step.event_type.clone(),
                    from_version: 0,
                    current: 0,
                });
            }
            if let Some(c) = entry.current {
                if step.from_version >= c {
                    return Err(UpcastError::StepBeyondCurrent {
                        event_type: step.event_type.clone(),
                        from_version: step.from_version,
                        current: c,
                    });
                }
            }
            if entry
                .steps
                .insert(step.from_version, Arc::new(step.clone()))
                .is_some()
            {
                return Err(UpcastError::DuplicateStep {
                    event_type: step.event_type.clone(),
                    from_version: step.from_version,
                });
            }
        }
        // Where each declared type's chain starts: an explicit declaration,
        // else the lowest of 1 (or its own lowest step) and the versions
        // renames lead to.
        let mut landings: HashMap<&str, u32> = HashMap::new();
        for step in &self.steps {
            if step.rename_to.is_some() {
                let v = step.from_version + 1;
                let low = landings.entry(step.target_type()).or_insert(v);
                *low = (*low).min(v);
            }
        }
        // Every step must lead somewhere: to a declared type at or below its
        // current version (whose own chain is checked below), or to a step.
        for step in &self.steps {
            let target = step.target_type();
            let version = step.from_version + 1;
            let continues = types
                .get(target)
                .is_some_and(|t| t.steps.contains_key(&version));
            match current(target) {
                Some(c) if version <= c => {}
                Some(c) => {
                    return Err(UpcastError::StepBeyondCurrent {
                        event_type: target.to_owned(),
                        from_version: version - 1,
                        current: c,
                    })
                }
                None if continues => {}
                None => {
                    return Err(UpcastError::DeadEnd {
                        event_type: target.to_owned(),
                        version,
                    })
                }
            }
        }
        let mut names: Vec<&str> = types.keys().map(String::as_str).collect();
        names.extend(landings.keys());
        names.extend(declared);
        names.sort_unstable();
        names.dedup();
        for name in names {
            let Some(c) = current(name) else { continue };
            let own = types.get(name);
            let lowest_own = own.and_then(|t| t.steps.keys().next().copied());
            let start = match self.introduced.iter().find(|(t, _)| t == name) {
                Some(&(_, v)) => v,
                None => match (landings.get(name), lowest_own) {
                    (None, _) => 1,
                    (Some(&l), Some(o)) => l.min(o),
                    (Some(&l), None) => l,
                },
            };
            for v in start..c {
                if !own.is_some_and(|t| t.steps.contains_key(&v)) {
                    return Err(UpcastError::MissingStep {
                        event_type: name.to_owned(),
                        from_version: v,
                        to_version: v + 1,
                    });
                }
            }
        }
        types.retain(|_, t| !t.steps.is_empty());
        // A chain transform is kept only where the registry's chain from its
        // step goes through the steps it stands for.
        let mut unfuse = Vec::new();
        for (name, t) in &types {
            for (&version, step) in &t.steps {
                let Some(fused) = &step.fused else { continue };
                let mut at = (name.as_str(), version);
                let mut same = true;
                for covered in &fused.covers {
                    let next = types.get(at.0).and_then(|t| t.steps.get(&at.1));
                    match next.and_then(|s| s.transform.as_ref().map(|f| (s, f))) {
                        Some((s, f)) if Arc::ptr_eq(f, covered) => {
                            at = (s.target_type(), at.1 + 1);
                        }
                        _ => {
                            same = false;
                            break;
                        }
                    }
                }
                if !same || at.0 != fused.target {
                    unfuse.push((name.clone(), version));
                }
            }
        }
        for (name, version) in unfuse {
            if let Some(step) = types.get_mut(&name).and_then(|t| t.steps.get_mut(&version)) {
                let mut plain = Step::clone(step);
                plain.fused = None;
                *step = Arc::new(plain);
            }
        }
        Ok(Upcasters { types })
    }
}

struct TypeSteps {
    /// The application's current version of the type (`None`: a name it no
    /// longer reads, kept for the steps that rename it).
    current: Option<u32>,
    steps: BTreeMap<u32, Arc<Step>>,
}

/// Upcasting: reading events stored by older versions of the application.
///
/// An event type's payload has a current version (declared on the event enum
/// with `#[event(version = N)]`, see [`current_versions`]). Events stored at
/// an older version are brought to the current one as they are read, by a
/// chain of [`Step`]s: each takes one stored event of `(type, N)` to
/// `(type', N + 1)`, with a payload transform and an optional new type name.
/// One event in, one event out, so stream versions and global positions keep
/// their meaning.
///
/// [`Upcasters`] is the validated registry. It is checked when it is built,
/// against the current versions the application declares: a missing link is
/// [`UpcastError::MissingStep`] naming the type and both versions, raised
/// before any read rather than in the middle of a replay.
///
/// A store carries the registry (each backend's `with_upcasters`) and applies
/// it in the one function where its rows become [`RecordedEvent`]s, so every
/// read path (aggregate loads, `read_stream`, `read_all`, `read_event`, the
/// snapshot jobs, the tools) sees the current shape. An event already at its
/// current version is not copied: [`Upcasters::apply`] looks its type up in a
/// hash map (nothing at all for an empty registry) and hands the event back.
/// An upcasted event keeps its stored form in
/// [`RecordedEvent::stored_event_version`] and
/// [`RecordedEvent::stored_event_type`]; the stored bytes never change.
///
/// ```
/// use annals::{Step, Upcasters};
/// use serde_json::json;
///
/// let upcasters = Upcasters::builder()
///     .step(Step::new("Deposited", 1, |mut v: serde_json::Value| {
///         v["currency"] = json!("EUR");
///         Ok::<_, std::convert::Infallible>(v)
///     }))
///     .build(&[("Deposited", 2)])?;
/// assert!(upcasters.needs_upcast("Deposited", 1));
/// assert!(!upcasters.needs_upcast("Deposited", 2));
///
/// // A missing link is refused before anything is read.
/// let missing = Upcasters::builder().build(&[("Deposited", 2)]);
/// assert_eq!(
///     missing.unwrap_err().to_string(),
///     "no upcaster for event type \"Deposited\" from version 1 to version 2"
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Built with [`Upcasters::builder`]; an empty registry
/// ([`Upcasters::default`]) upcasts nothing and costs nothing.
#[derive(Default)]
pub struct Upcasters {
    types: HashMap<String, TypeSteps>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: Vec<(&str, u32)> = self
            .types
            .iter()
            .flat_map(|(t, s)| s.steps.keys().map(move |v| (t.as_str(), *v)))
            .collect();
        steps.sort_unstable();
        f.debug_struct("Upcasters").field("steps", &steps).finish()
    }
}

impl Upcasters {
    /// A builder with no steps.
    pub fn builder() -> UpcastersBuilder {
        UpcastersBuilder::default()
    }

    /// Whether the step reading `(event_type, version)` runs a chain
    /// transform (see [`Step::fuse`]).
    #[cfg(all(test, feature = "plan"))]
    pub(crate) fn is_fused(&self, event_type: &str, version: u32) -> bool {
        self.types
            .get(event_type)
            .and_then(|t| t.steps.get(&version))
            .is_some_and(|s| s.fused.is_some())
    }

    /// Whether the registry has no step.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// Whether an event stored as `(event_type, version)` is changed by the
    /// registry. One hash lookup; none for an empty registry.
    pub fn needs_upcast(&self, event_type: &str, version: u32) -> bool {
        self.first_steps(event_type, version).is_some()
    }

    /// The steps of `event_type` when one of them reads `version`.
    fn first_steps(&self, event_type: &str, version: u32) -> Option<&TypeSteps> {
        if self.types.is_empty() {
            return None;
        }
        self.types
            .get(event_type)
            .filter(|t| t.steps.contains_key(&version))
    }

    /// Brings `event` to its type's current version. An event no step reads
    /// (already current, or a type the registry does not know) is returned
    /// as it is, without a copy. Otherwise the payload is parsed once, run
    /// through every step of the chain and written back, and the event
    /// records its stored type and version.
    ///
    /// A failing step (or a payload that does not parse, or a result that
    /// is not a storable payload) is [`Error::Upcast`] naming the event's
    /// stream, version, position, stored type and version, and the step.
    pub fn apply(&self, event: RecordedEvent) -> Result<RecordedEvent> {
        match self.first_steps(&event.event_type, event.event_version) {
            None => Ok(event),
            Some(steps) => self.upcast(event, steps),
        }
    }

    /// [`apply`](Upcasters::apply) to a borrowed event: cloned only when it
    /// is returned unchanged.
    pub fn apply_ref(&self, event: &RecordedEvent) -> Result<RecordedEvent> {
        match self.first_steps(&event.event_type, event.event_version) {
            None => Ok(event.clone()),
            Some(steps) => self.upcast(event.clone(), steps),
        }
    }

    /// Runs the chain from `steps`, the stored type's (found by
    /// [`Upcasters::first_steps`]): the type's steps are looked up again
    /// only when a step renames the event.
    fn upcast<'a>(
        &'a self,
        mut event: RecordedEvent,
        mut steps: &'a TypeSteps,
    ) -> Result<RecordedEvent> {
        // `event.event_type` stays the stored type until the end; the type
        // a step renamed the event to is borrowed from the registry, so a
        // chain allocates no type name unless it renames.
        let stored_version = event.event_version;
        let fail = |event: &RecordedEvent, step: String, source: BoxError| {
            Error::Upcast(Box::new(UpcastFailure {
                stream: event.stream_id.clone(),
                version: event.stream_version,
                position: event.global_position,
                event_type: event.event_type.clone(),
                stored_version,
                step,
                source,
            }))
        };
        // Parsed lazily: a chain of relabels never parses the payload.
        let mut value: Option<Value> = None;
        let mut renamed: Option<&str> = None;
        // The type `steps` belongs to.
        let mut steps_of: &str = event.event_type.as_str();
        let mut version = stored_version;
        loop {
            let current = renamed.unwrap_or(event.event_type.as_str());
            if current != steps_of {
                match self.types.get(current) {
                    Some(t) => steps = t,
                    None => break,
                }
                steps_of = current;
            }
            let Some(step) = steps.steps.get(&version) else {
                break;
            };
            if let Some(fused) = &step.fused {
                // The stored text as it is, when no step parsed it yet.
                let input = match &value {
                    Some(v) => ChainInput::Value(v),
                    None => ChainInput::Json(event.data.as_str()),
                };
                if let Ok(output) = (fused.transform)(input) {
                    match output {
                        ChainOutput::Value(v) => value = Some(v),
                        // Later steps, if any, parse it.
                        ChainOutput::Payload(p) => {
                            value = None;
                            event.data = p;
                        }
                    }
                    renamed = Some(fused.target.as_str());
                    version += fused.covers.len() as u32;
                    continue;
                }
                // Failed: the steps one by one name the failing one (and a
                // payload that does not parse is reported below).
            }
            if let Some(transform) = &step.transform {
                let input = match value.take() {
                    Some(v) => v,
                    None => event.data.to_value().map_err(|e| {
                        fail(&event, step.describe(), format!("the payload: {e}").into())
                    })?,
                };
                let output = transform(input).map_err(|e| fail(&event, step.describe(), e))?;
                value = Some(output);
            }
            renamed = Some(step.target_type());
            version += 1;
        }
        if let Some(v) = value {
            event.data = Payload::from_value(&v).map_err(|e| {
                let current = renamed.unwrap_or(event.event_type.as_str());
                fail(
                    &event,
                    format!("{current} v{version}"),
                    format!("the upcasted payload: {e}").into(),
                )
            })?;
        }
        if let Some(current) = renamed.filter(|t| *t != event.event_type) {
            let stored = std::mem::replace(&mut event.event_type, current.to_owned());
            event.stored_event_type = Some(stored);
        }
        event.stored_event_version = Some(stored_version);
        event.event_version = version;
        Ok(event)
    }
}

/// A store handle that can carry an [`Upcasters`] registry: every backend
/// implements it, so that generic code (the conformance suite, a tool) can
/// attach a registry or read as stored. Handles share their data: both
/// methods return a new handle on the same store.
pub trait Upcasting: Sized {
    /// This store with every read upcast by `upcasters`.
    fn with_upcasters(self, upcasters: Arc<Upcasters>) -> Self;
    /// This store reading events as stored, without upcasters.
    fn raw(&self) -> Self;
}

impl Upcasting for crate::InMemoryStore {
    fn with_upcasters(self, upcasters: Arc<Upcasters>) -> Self {
        crate::InMemoryStore::with_upcasters(self, upcasters)
    }
    fn raw(&self) -> Self {
        crate::InMemoryStore::raw(self)
    }
}

/// Applies an optional registry (what a store carries): `None` hands the
/// event back.
pub fn upcast_event(upcasters: Option<&Upcasters>, event: RecordedEvent) -> Result<RecordedEvent> {
    match upcasters {
        Some(u) => u.apply(event),
        None => Ok(event),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventId, GlobalPosition, Metadata, StreamId, StreamVersion};
    use serde_json::json;

    fn stored(event_type: &str, version: u32, data: Value) -> RecordedEvent {
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::parse("Account-1").expect("stream"),
            stream_version: StreamVersion(7),
            global_position: GlobalPosition::from_seq(42),
            event_type: event_type.to_owned(),
            event_version: version,
            data: Payload::from_value(&data).expect("payload"),
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
            stored_event_version: None,
            stored_event_type: None,
        }
    }

    fn add(key: &'static str, value: Value) -> impl Fn(Value) -> Result<Value, BoxError> {
        move |mut v: Value| {
            v[key] = value.clone();
            Ok(v)
        }
    }

    #[test]
    fn a_chain_with_a_rename_reaches_the_current_version() {
        let u = Upcasters::builder()
            .step(Step::new("Deposited", 1, add("a", json!(1))).rename_to("MoneyIn"))
            .step(Step::new("MoneyIn", 2, add("b", json!(2))))
            .build(&[("MoneyIn", 3)])
            .expect("valid");
        let e = u
            .apply(stored("Deposited", 1, json!({"x": 0})))
            .expect("upcast");
        assert_eq!(e.event_type, "MoneyIn");
        assert_eq!(e.event_version, 3);
        assert_eq!(e.data, json!({"x": 0, "a": 1, "b": 2}));
        assert_eq!(e.stored_event_version, Some(1));
        assert_eq!(e.stored_event_type.as_deref(), Some("Deposited"));
        // From the middle of the chain.
        let e = u.apply(stored("MoneyIn", 2, json!({}))).expect("upcast");
        assert_eq!((e.event_version, e.stored_event_type), (3, None));
        assert_eq!(e.data, json!({"b": 2}));
    }

    #[test]
    fn a_current_event_is_handed_back_without_a_copy() {
        let u = Upcasters::builder()
            .step(Step::new("Deposited", 1, add("a", json!(1))))
            .build(&[("Deposited", 2)])
            .expect("valid");
        let e = stored("Deposited", 2, json!({"big": "x".repeat(100)}));
        let before = e.data.as_str().as_ptr();
        let after = u.apply(e).expect("unchanged");
        assert_eq!(after.data.as_str().as_ptr(), before);
        assert_eq!(after.stored_event_version, None);
        let unknown = u.apply(stored("Other", 1, json!({}))).expect("unchanged");
        assert_eq!(unknown.event_version, 1);
        assert!(Upcasters::default().is_empty());
        assert!(!Upcasters::default().needs_upcast("Deposited", 1));
    }

    #[test]
    fn a_relabel_keeps_the_payload_unparsed() {
        let u = Upcasters::builder()
            .step(Step::relabel("Opened", 1))
            .build(&[("Opened", 2)])
            .expect("valid");
        let e = stored("Opened", 1, json!({"name": "ann"}));
        let before = e.data.as_str().as_ptr();
        let e = u.apply(e).expect("upcast");
        assert_eq!((e.event_version, e.stored_event_version), (2, Some(1)));
        assert_eq!(e.data.as_str().as_ptr(), before);
    }

    #[test]
    fn build_errors_name_the_type_and_versions() {
        let current = [("Deposited", 3), ("Opened", 1)];
        let step = |t: &str, v| Step::new(t, v, |v: Value| Ok::<_, BoxError>(v));
        let missing = Upcasters::builder()
            .step(step("Deposited", 1))
            .build(&current)
            .expect_err("hole");
        assert_eq!(
            missing,
            UpcastError::MissingStep {
                event_type: "Deposited".into(),
                from_version: 2,
                to_version: 3
            }
        );
        // No step at all for a type above version 1 is a hole from 1.
        let none = Upcasters::builder().build(&current).expect_err("hole");
        assert!(matches!(
            none,
            UpcastError::MissingStep {
                from_version: 1,
                ..
            }
        ));
        // Unless its history starts later.
        Upcasters::builder()
            .introduced_at("Deposited", 3)
            .build(&current)
            .expect("introduced at its current version");
        let dup = Upcasters::builder()
            .step(step("Deposited", 1))
            .step(step("Deposited", 1))
            .step(step("Deposited", 2))
            .build(&current)
            .expect_err("duplicate");
        assert!(matches!(
            dup,
            UpcastError::DuplicateStep {
                from_version: 1,
                ..
            }
        ));
        let beyond = Upcasters::builder()
            .step(step("Opened", 1))
            .build(&current)
            .expect_err("beyond");
        assert_eq!(
            beyond.to_string(),
            "an upcaster for event type \"Opened\" reads version 1, but the current version is 1"
        );
        let dead = Upcasters::builder()
            .step(step("Old", 1).rename_to("Older"))
            .build(&current)
            .expect_err("dead end");
        assert_eq!(
            dead,
            UpcastError::DeadEnd {
                event_type: "Older".into(),
                version: 2
            }
        );
        // The tool's build takes each chain's end as current.
        let tool = Upcasters::builder()
            .step(step("Deposited", 1))
            .step(step("Deposited", 2))
            .build_without_types()
            .expect("complete");
        assert!(tool.needs_upcast("Deposited", 2));
        let hole = Upcasters::builder()
            .step(step("Deposited", 1))
            .step(step("Deposited", 3))
            .build_without_types()
            .expect_err("hole");
        assert!(matches!(
            hole,
            UpcastError::MissingStep {
                from_version: 2,
                ..
            }
        ));
    }

    /// Aliases are types of their own for the chain check.
    #[test]
    fn an_alias_needs_its_own_chain() {
        #[derive(serde::Serialize, serde::Deserialize, crate::DomainEvent)]
        enum E {
            #[event(version = 2)]
            #[serde(alias = "Frozen")]
            Locked,
        }
        assert_eq!(current_versions::<E>(), [("Locked", 2), ("Frozen", 2)]);
        let relabel = || Step::relabel("Locked", 1);
        let err = Upcasters::builder()
            .step(relabel())
            .build_for::<E>()
            .expect_err("Frozen v1 has no step");
        assert!(
            matches!(err, UpcastError::MissingStep { ref event_type, .. } if event_type == "Frozen")
        );
        Upcasters::builder()
            .step(relabel())
            .introduced_at("Frozen", 2)
            .build_for::<E>()
            .expect("Frozen was only ever stored at v2");
    }

    #[test]
    fn a_failing_step_names_the_event() {
        let u = Upcasters::builder()
            .step(Step::new("Deposited", 1, |_v: Value| {
                Err::<Value, _>("amount is not a number")
            }))
            .build(&[("Deposited", 2)])
            .expect("valid");
        let err = u
            .apply(stored("Deposited", 1, json!({"amount": "x"})))
            .expect_err("fails");
        assert!(matches!(
            &err,
            Error::Upcast(f) if f.stream.as_str() == "Account-1" && f.version.get() == 7
                && f.position == GlobalPosition::from_seq(42) && f.event_type == "Deposited"
                && f.stored_version == 1
        ));
        assert_eq!(
            err.to_string(),
            "cannot upcast event \"Deposited\" stored at v1 at Account-1 version 7 (position 42): \
             step Deposited v1 failed: amount is not a number"
        );
    }
}
