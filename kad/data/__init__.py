"""Images and where they come from: decoding (:mod:`kad.data.images`), datasets
(:mod:`kad.data.datasets`), preprocessing (:mod:`kad.data.preprocessing`) and the
evaluation protocols that split them (:mod:`kad.data.protocols`)."""
