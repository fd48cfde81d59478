//! Code every middleware service of the crate shares.

/// `with_acr_values` and `with_max_age` for a login setting with a
/// `step_up` field: what a login asks of the provider beyond a plain login.
#[cfg(feature = "oidc")]
macro_rules! step_up_setters {
    ($scope:literal) => {
        #[doc = concat!("Authentication context classes ", $scope, " asks for, any one of them")]
        /// (`acr_values`; default none): the ID token's `acr` must be one of
        /// them.
        #[must_use]
        pub fn with_acr_values<I, S>(mut self, values: I) -> Self
        where
            I: IntoIterator<Item = S>,
            S: Into<String>,
        {
            self.step_up.set_acr_values(values);
            self
        }

        #[doc = concat!("The most time since the user last authenticated at the provider that ", $scope, " accepts")]
        /// (`max_age`; default none): the ID token's `auth_time` must show it.
        #[must_use]
        pub fn with_max_age(mut self, age: std::time::Duration) -> Self {
            self.step_up.max_age = Some(age);
            self
        }
    };
}

/// `get_ref`, `get_mut` and `into_inner` for a service whose wrapped
/// service is its `inner` field, as tower-http's services have them.
macro_rules! inner_service_accessors {
    () => {
        /// The wrapped service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The wrapped service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Unwraps the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}
