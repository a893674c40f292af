"""Text → tokens → activations: TextSource, TokenStream, ActivationStream, ActivationCache."""
