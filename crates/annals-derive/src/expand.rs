//! Reads the enum and its serde attributes, refuses what does not map onto
//! the store, and generates the impl.
//!
//! Every problem found is reported, not only the first (errors are collected
//! and combined), and when there is any, no impl is emitted: a half-right
//! impl would only add follow-on errors.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, ToTokens};
use syn::meta::ParseNestedMeta;
use syn::{Data, DeriveInput, Error, LitStr, Result, Token};

use crate::case::{RenameRule, RULES};

/// Why only serde's default representation will do; the tail of every
/// message that refuses another one.
const EXTERNAL_ONLY: &str = "the store keeps an event's type name apart from its payload, so only \
     serde's default, externally tagged representation (the variant's name is the event type, \
     its content the payload) maps onto it";

/// Errors collected while reading the input.
#[derive(Default)]
struct Errors(Option<Error>);

impl Errors {
    fn push(&mut self, error: Error) {
        match &mut self.0 {
            Some(first) => first.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.push(Error::new_spanned(tokens, message));
    }

    fn finish(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The enum-level attributes that matter here.
struct Container {
    /// `rename_all` for serialization and for deserialization.
    rename_ser: Option<RenameRule>,
    rename_de: Option<RenameRule>,
    /// Where the `annals` crate is.
    krate: syn::Path,
}

/// One variant: its stored name, the other names it is read under, and its
/// current version.
struct Variant<'a> {
    ident: &'a syn::Ident,
    name: String,
    aliases: Vec<String>,
    version: u32,
    /// `#[event(personal(subject = "..", fields(..)))]`: the subject field
    /// and the personal fields (as serialized).
    personal: Option<(String, Vec<String>)>,
}

pub(crate) fn derive(input: &DeriveInput) -> Result<TokenStream> {
    let data =
        match &input.data {
            Data::Enum(data) => data,
            Data::Struct(s) => return Err(Error::new(
                s.struct_token.span,
                "DomainEvent can only be derived for an enum (each variant is one event type), \
                 not for a struct",
            )),
            Data::Union(u) => return Err(Error::new(
                u.union_token.span,
                "DomainEvent can only be derived for an enum (each variant is one event type), \
                 not for a union",
            )),
        };
    let mut errors = Errors::default();
    let container = container(input, &mut errors);
    let variants: Vec<Variant<'_>> = data
        .variants
        .iter()
        .filter_map(|v| variant(v, &container, &mut errors))
        .collect();
    check_unique(&variants, &mut errors);
    errors.finish()?;
    Ok(generate(input, &container, &variants))
}

/// Reads the enum's `#[serde(..)]` and `#[event(..)]` attributes.
fn container(input: &DeriveInput, errors: &mut Errors) -> Container {
    let mut out = Container {
        rename_ser: None,
        rename_de: None,
        krate: syn::parse_quote!(::annals),
    };
    let mut tag = None;
    let mut content = None;
    for attr in &input.attrs {
        if attr.path().is_ident("serde") {
            if !has_arguments(attr) {
                continue;
            }
            let parsed = attr.parse_nested_meta(|meta| {
                let path = &meta.path;
                if path.is_ident("rename_all") {
                    let (ser, de) = ser_and_de(&meta)?;
                    out.rename_ser = rule(ser.first(), errors).or(out.rename_ser);
                    out.rename_de = rule(de.first(), errors).or(out.rename_de);
                } else if path.is_ident("tag") {
                    tag = Some(path.clone());
                    skip_value(&meta)?;
                } else if path.is_ident("content") {
                    content = Some(path.clone());
                    skip_value(&meta)?;
                } else if path.is_ident("untagged") {
                    errors.spanned(
                        path,
                        format_args!(
                            "`#[serde(untagged)]` writes no type name at all, so events of this \
                             enum cannot be stored: {EXTERNAL_ONLY}"
                        ),
                    );
                } else if path.is_ident("into")
                    || path.is_ident("from")
                    || path.is_ident("try_from")
                {
                    let key = path_name(path);
                    errors.spanned(
                        path,
                        format_args!(
                            "`#[serde({key} = ..)]` makes serde {} this enum as another type, \
                             so its variants are not the stored event types; derive \
                             DomainEvent on an enum that serde handles itself",
                            if key == "into" { "write" } else { "read" }
                        ),
                    );
                    skip_value(&meta)?;
                } else if path.is_ident("variant_identifier") || path.is_ident("field_identifier") {
                    errors.spanned(
                        path,
                        format_args!(
                            "`#[serde({})]` reads this enum from a bare name, not from a stored \
                             event: {EXTERNAL_ONLY}",
                            path_name(path)
                        ),
                    );
                } else {
                    // serde's business (and serde reports its own typos).
                    skip_value(&meta)?;
                }
                Ok(())
            });
            if let Err(e) = parsed {
                errors.push(e);
            }
        } else if attr.path().is_ident("event") {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("crate") {
                    let lit: LitStr = meta.value()?.parse()?;
                    out.krate = lit.parse()?;
                } else if meta.path.is_ident("version") {
                    errors.spanned(
                        &meta.path,
                        "`#[event(version = ..)]` goes on a variant: each event type has its \
                         own version",
                    );
                    skip_value(&meta)?;
                } else {
                    return Err(meta.error(format_args!(
                        "unknown event attribute `{}` on an enum; expected `crate = \"..\"`",
                        path_name(&meta.path)
                    )));
                }
                Ok(())
            });
            if let Err(e) = parsed {
                errors.push(e);
            }
        }
    }
    match (tag, content) {
        (Some(tag), Some(_)) => errors.spanned(
            tag,
            format_args!(
                "`#[serde(tag = .., content = ..)]` makes this enum adjacently tagged, which \
                 stores the type name inside the payload: {EXTERNAL_ONLY}"
            ),
        ),
        (Some(tag), None) => errors.spanned(
            tag,
            format_args!(
                "`#[serde(tag = ..)]` makes this enum internally tagged, which stores the type \
                 name inside the payload: {EXTERNAL_ONLY}"
            ),
        ),
        (None, Some(content)) => errors.spanned(
            content,
            format_args!(
                "`#[serde(content = ..)]` is for adjacently tagged enums, which store the type \
                 name inside the payload: {EXTERNAL_ONLY}"
            ),
        ),
        (None, None) => {}
    }
    out
}

/// Reads one variant's attributes; `None` when it is refused (the reason is
/// in `errors`).
fn variant<'a>(
    v: &'a syn::Variant,
    container: &Container,
    errors: &mut Errors,
) -> Option<Variant<'a>> {
    let mut ok = true;
    let mut ser_name: Option<String> = None;
    let mut de_names: Vec<String> = Vec::new();
    let mut aliases: Vec<String> = Vec::new();
    let mut version: Option<u32> = None;
    let mut personal: Option<(String, Vec<String>)> = None;
    for attr in &v.attrs {
        if attr.path().is_ident("serde") {
            if !has_arguments(attr) {
                continue;
            }
            let parsed = attr.parse_nested_meta(|meta| {
                let path = &meta.path;
                if path.is_ident("rename") {
                    let (ser, de) = ser_and_de(&meta)?;
                    if let Some(ser) = ser.first() {
                        ser_name = Some(ser.value());
                    }
                    de_names.extend(de.iter().map(LitStr::value));
                } else if path.is_ident("alias") {
                    let lit: LitStr = meta.value()?.parse()?;
                    aliases.push(lit.value());
                } else if let Some(why) = refused_variant_attr(path, &v.ident) {
                    errors.spanned(path, why);
                    ok = false;
                } else {
                    // `rename_all` (of the fields), `with`, `bound`, ...:
                    // the payload's business, not the type name's.
                    skip_value(&meta)?;
                }
                Ok(())
            });
            if let Err(e) = parsed {
                errors.push(e);
                ok = false;
            }
        } else if attr.path().is_ident("event") {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("version") {
                    let lit: syn::LitInt = meta.value()?.parse()?;
                    let n: u32 = lit.base10_parse().map_err(|_| {
                        Error::new(lit.span(), "the event version must be a u32 of at least 1")
                    })?;
                    if n == 0 {
                        return Err(Error::new(
                            lit.span(),
                            "event versions start at 1: `#[event(version = 0)]` is not allowed",
                        ));
                    }
                    if version.replace(n).is_some() {
                        return Err(meta.error("duplicate `version` for this variant"));
                    }
                } else if meta.path.is_ident("personal") {
                    if personal.is_some() {
                        return Err(meta.error("duplicate `personal(..)` for this variant"));
                    }
                    personal = Some(personal_attr(&meta, v)?);
                } else {
                    return Err(meta.error(format_args!(
                        "unknown event attribute `{}` on a variant; expected `version = N` or \
                         `personal(subject = \"..\", fields(\"..\", ..))`",
                        path_name(&meta.path)
                    )));
                }
                Ok(())
            });
            if let Err(e) = parsed {
                errors.push(e);
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }

    // serde's own rules: an explicit rename wins, else `rename_all` applies
    // to the Rust name (without `r#`); the first deserialize rename is the
    // name read, and every deserialize rename is also an alias.
    let rust_name = v.ident.to_string();
    let rust_name = rust_name.trim_start_matches("r#");
    let apply = |rule: Option<RenameRule>| match rule {
        Some(rule) => rule.apply_to_variant(rust_name),
        None => rust_name.to_owned(),
    };
    let written = ser_name.unwrap_or_else(|| apply(container.rename_ser));
    let read = de_names
        .first()
        .cloned()
        .unwrap_or_else(|| apply(container.rename_de));
    if written != read {
        errors.spanned(
            &v.ident,
            format_args!(
                "variant `{}` is written as {written:?} but read as {read:?} (serde `rename` or \
                 `rename_all` with different serialize and deserialize names); the store keeps \
                 one type name per event, so give it one name with `rename = \"..\"` and keep \
                 other names readable with `alias = \"..\"`",
                v.ident
            ),
        );
        return None;
    }
    let mut other_names = Vec::new();
    for name in de_names.into_iter().chain(aliases) {
        if name != written && !other_names.contains(&name) {
            other_names.push(name);
        }
    }
    Some(Variant {
        ident: &v.ident,
        name: written,
        aliases: other_names,
        version: version.unwrap_or(1),
        personal,
    })
}

/// The payload names of a variant's named fields: each field's serde
/// `rename` (serialize side), else its Rust name.
fn field_names(v: &syn::Variant) -> Option<Vec<String>> {
    let syn::Fields::Named(named) = &v.fields else {
        return None;
    };
    let mut out = Vec::new();
    for f in &named.named {
        let mut name = f
            .ident
            .as_ref()
            .map(|i| i.to_string().trim_start_matches("r#").to_owned())
            .unwrap_or_default();
        for attr in f.attrs.iter().filter(|a| a.path().is_ident("serde")) {
            let _ = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    if let Ok((ser, _)) = ser_and_de(&meta) {
                        if let Some(ser) = ser.first() {
                            name = ser.value();
                        }
                    }
                } else {
                    skip_value(&meta)?;
                }
                Ok(())
            });
        }
        out.push(name);
    }
    Some(out)
}

/// Reads `personal(subject = "..", fields("..", ..))` on variant `v`.
fn personal_attr(meta: &ParseNestedMeta<'_>, v: &syn::Variant) -> Result<(String, Vec<String>)> {
    let mut subject: Option<LitStr> = None;
    let mut fields: Vec<LitStr> = Vec::new();
    meta.parse_nested_meta(|inner| {
        if inner.path.is_ident("subject") {
            subject = Some(inner.value()?.parse()?);
        } else if inner.path.is_ident("fields") {
            let content;
            syn::parenthesized!(content in inner.input);
            let lits =
                syn::punctuated::Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?;
            fields.extend(lits);
        } else {
            return Err(inner.error(format_args!(
                "unknown key `{}` in `personal(..)`; expected `subject = \"..\"` and \
                 `fields(\"..\", ..)`",
                path_name(&inner.path)
            )));
        }
        Ok(())
    })?;
    let Some(known) = field_names(v) else {
        return Err(meta.error(format_args!(
            "`personal(..)` needs a variant with named fields; variant `{}` has none",
            v.ident
        )));
    };
    let Some(subject) = subject else {
        return Err(meta.error(
            "`personal(..)` needs `subject = \"field\"`: the field holding the id of the person \
             the personal fields belong to (their data key is that subject's)",
        ));
    };
    if fields.is_empty() {
        return Err(meta.error("`personal(..)` needs `fields(\"..\", ..)` with at least one field"));
    }
    for lit in std::iter::once(&subject).chain(&fields) {
        if !known.contains(&lit.value()) {
            return Err(Error::new(
                lit.span(),
                format_args!(
                    "variant `{}` has no field {:?} (its fields are {})",
                    v.ident,
                    lit.value(),
                    known.join(", ")
                ),
            ));
        }
    }
    if let Some(lit) = fields.iter().find(|f| f.value() == subject.value()) {
        return Err(Error::new(
            lit.span(),
            "the subject field cannot be personal: it stays in clear so the subject's key can be \
             found (and forgotten)",
        ));
    }
    let mut names: Vec<String> = Vec::new();
    for lit in &fields {
        if names.contains(&lit.value()) {
            return Err(Error::new(
                lit.span(),
                format_args!("field {:?} is listed twice", lit.value()),
            ));
        }
        names.push(lit.value());
    }
    Ok((subject.value(), names))
}

/// Why a serde attribute on variant `ident` is refused, if it is.
fn refused_variant_attr(path: &syn::Path, ident: &syn::Ident) -> Option<String> {
    let key = path_name(path);
    Some(match key.as_str() {
        "untagged" => format!(
            "`#[serde(untagged)]` writes variant `{ident}` without its name, so its events could \
             not be read back as this type: {EXTERNAL_ONLY}"
        ),
        "other" => "`#[serde(other)]` would read every event type this enum does not know as \
                    this variant; annals reports an unknown stored type as \
                    `Error::UnknownEventType` instead of dropping it, so remove the attribute"
            .to_owned(),
        "skip" | "skip_serializing" => format!(
            "`#[serde({key})]`: variant `{ident}` could never be written, so it is not an event \
             type; remove the variant or the attribute"
        ),
        "skip_deserializing" => format!(
            "`#[serde(skip_deserializing)]`: events of variant `{ident}` would be written but \
             could never be read back; remove the attribute"
        ),
        _ => return None,
    })
}

/// Two variants under one type name would write events that read back as the
/// wrong variant.
fn check_unique(variants: &[Variant<'_>], errors: &mut Errors) {
    let mut seen: Vec<(&str, &syn::Ident)> = Vec::new();
    for v in variants {
        for name in std::iter::once(&v.name).chain(&v.aliases) {
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name.as_str()) {
                errors.spanned(
                    v.ident,
                    format_args!(
                        "variant `{}` has the event type name {name:?} (as its name or an \
                         alias), which variant `{first}` already has; each type name must \
                         belong to one variant",
                        v.ident
                    ),
                );
            } else {
                seen.push((name, v.ident));
            }
        }
    }
}

fn generate(input: &DeriveInput, container: &Container, variants: &[Variant<'_>]) -> TokenStream {
    let krate = &container.krate;
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    // A generic enum is an event only for the parameters that make it one;
    // the bounds go on the impl, not on the enum, where they would clash with
    // those serde's derives add. (They name `serde` as the crate is usually
    // called; a non-generic enum needs no bound at all.)
    let mut where_clause = where_clause.cloned();
    if input.generics.type_params().next().is_some() {
        where_clause
            .get_or_insert_with(|| syn::parse_quote!(where))
            .predicates
            .push(syn::parse_quote! {
                #ident #ty_generics: ::serde::Serialize
                    + ::serde::de::DeserializeOwned
                    + ::core::marker::Send
                    + ::core::marker::Sync
                    + 'static
            });
    }
    let lit = |s: &str| LitStr::new(s, Span::call_site());

    let idents: Vec<_> = variants.iter().map(|v| v.ident).collect();
    let names: Vec<_> = variants.iter().map(|v| lit(&v.name)).collect();
    let versions: Vec<_> = variants.iter().map(|v| v.version).collect();
    let all_names = variants.iter().map(|v| lit(&v.name)).chain(
        variants
            .iter()
            .flat_map(|v| v.aliases.iter().map(|a| lit(a))),
    );
    let read_names = variants.iter().map(|v| {
        let names = std::iter::once(&v.name).chain(&v.aliases).map(|n| lit(n));
        quote!(#(#names)|*)
    });

    let personal = variants.iter().filter_map(|v| {
        let (subject, fields) = v.personal.as_ref()?;
        let names = std::iter::once(&v.name).chain(&v.aliases).map(|n| lit(n));
        let subject = lit(subject);
        let fields = fields.iter().map(|f| lit(f));
        Some(quote! {
            #(#names)|* => ::core::option::Option::Some(#krate::PersonalData {
                subject: #subject,
                fields: &[#(#fields),*],
            }),
        })
    });
    let personal: Vec<_> = personal.collect();
    let personal_fn = if personal.is_empty() {
        quote!()
    } else {
        quote! {
            fn personal_data(event_type: &str) -> ::core::option::Option<#krate::PersonalData> {
                match event_type {
                    #(#personal)*
                    _ => ::core::option::Option::None,
                }
            }
        }
    };

    quote! {
        #[automatically_derived]
        impl #impl_generics #krate::DomainEvent for #ident #ty_generics #where_clause {
            const EVENT_TYPES: &'static [&'static str] = &[#(#all_names),*];

            fn event_type(&self) -> &'static str {
                match *self {
                    #(Self::#idents { .. } => #names,)*
                }
            }

            fn event_version(&self) -> u32 {
                match *self {
                    #(Self::#idents { .. } => #versions,)*
                }
            }

            fn current_version(event_type: &str) -> ::core::option::Option<u32> {
                match event_type {
                    #(#read_names => ::core::option::Option::Some(#versions),)*
                    _ => ::core::option::Option::None,
                }
            }

            #personal_fn
        }
    }
}

/// `#[serde]` with nothing in it is serde's to accept or refuse.
fn has_arguments(attr: &syn::Attribute) -> bool {
    matches!(&attr.meta, syn::Meta::List(list) if !list.tokens.is_empty())
}

/// The names of `key = "x"` (both directions) or `key(serialize = "x",
/// deserialize = "y", ..)`, as serde accepts them for `rename` and
/// `rename_all`.
fn ser_and_de(meta: &ParseNestedMeta<'_>) -> Result<(Vec<LitStr>, Vec<LitStr>)> {
    if meta.input.peek(Token![=]) {
        let both: LitStr = meta.value()?.parse()?;
        return Ok((vec![both.clone()], vec![both]));
    }
    let mut ser = Vec::new();
    let mut de = Vec::new();
    meta.parse_nested_meta(|inner| {
        if inner.path.is_ident("serialize") {
            ser.push(inner.value()?.parse()?);
        } else if inner.path.is_ident("deserialize") {
            de.push(inner.value()?.parse()?);
        } else {
            return Err(inner.error("expected `serialize = \"..\"` or `deserialize = \"..\"`"));
        }
        Ok(())
    })?;
    Ok((ser, de))
}

/// The rule a `rename_all` names; an unknown one is reported.
fn rule(lit: Option<&LitStr>, errors: &mut Errors) -> Option<RenameRule> {
    let lit = lit?;
    let rule = RenameRule::from_name(&lit.value());
    if rule.is_none() {
        let expected: Vec<String> = RULES.iter().map(|(n, _)| format!("{n:?}")).collect();
        errors.spanned(
            lit,
            format_args!(
                "unknown rename rule `rename_all = {:?}`, expected one of {}",
                lit.value(),
                expected.join(", ")
            ),
        );
    }
    rule
}

/// Passes over the value of an attribute this derive does not read: `= ..`,
/// `(..)` or nothing, up to the next comma.
fn skip_value(meta: &ParseNestedMeta<'_>) -> Result<()> {
    while !meta.input.is_empty() && !meta.input.peek(Token![,]) {
        meta.input.parse::<TokenTree>()?;
    }
    Ok(())
}

fn path_name(path: &syn::Path) -> String {
    path.to_token_stream().to_string().replace(' ', "")
}
