"""Chart libraries model-written code and ChartMimic's references use render in the sandbox.

ChartMimic's own reference programs (graph, treemap, venn categories) import networkx, squarify
and matplotlib-venn, and model-written chart code often imports pandas and seaborn; without them
such programs end as runtime errors.
"""

import numpy as np
import pytest

from rrvf_jax import env
from rrvf_jax.eval import create_trace_pool, eval_sandbox_config, trace_code

HEAD = "import matplotlib.pyplot as plt\nimport numpy as np\n"
PROGRAMS = {
  "pandas": "import pandas as pd\n"
  "df = pd.DataFrame({'x': ['a', 'b', 'c'], 'y': [3, 1, 2]})\n"
  "df.plot(x='x', y='y', kind='bar', color='tab:green')\n",
  "seaborn": "import seaborn as sns\n"
  "sns.barplot(x=['a', 'b', 'c'], y=[3, 1, 2], color='tab:red')\n",
  "networkx": "import networkx as nx\n"
  "nx.draw(nx.path_graph(5), with_labels=True, node_color='tab:orange')\n",
  "squarify": "import squarify\n"
  "squarify.plot(sizes=[5, 3, 2], label=['A', 'B', 'C'], color=['red', 'green', 'blue'])\n",
  "matplotlib_venn": "from matplotlib_venn import venn2\nvenn2(subsets=(3, 2, 1))\n",
  "scipy": "from scipy import stats\n"
  "x = np.linspace(-3, 3, 50)\nplt.plot(x, stats.norm.pdf(x), color='tab:purple')\n",
}


@pytest.fixture(scope="module")
def chart_pool():
  with env.create_chart_pool(num_workers=1) as pool:
    yield pool


@pytest.mark.parametrize("library", sorted(PROGRAMS))
def test_library_renders_in_the_sandbox(chart_pool, library):
  result = env.render_chart(
    HEAD + PROGRAMS[library], canvas=env.ChartCanvas(224, 224, dpi=56), pool=chart_pool
  )
  assert result.ok, f"{library}: {result.status}: {result.message}"
  drawn = np.any(result.image < 200, axis=-1).mean()
  assert drawn > 0.01, f"{library}: the render is blank"


@pytest.fixture(scope="module")
def tracer():
  with create_trace_pool(1, config=eval_sandbox_config()) as pool:
    yield pool


@pytest.mark.parametrize("library", ["networkx", "squarify", "matplotlib_venn"])
def test_library_runs_in_the_benchmark_tracer(tracer, library):
  trace = trace_code(HEAD + PROGRAMS[library], pool=tracer)
  assert trace.ok, f"{library}: {trace.status}: {trace.message}"
  assert trace.image is not None and trace.n_axes >= 1
